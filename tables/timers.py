"""Durable timers kept inside a table, so they are changelogged like its data.

A timer index maps `prefix + due + "/" + key` to nothing; scanning it from the prefix up to
"now" finds every due key in order, without touching the rest of the table (Kafka Streams'
punctuation over a store, in a key range). Stream-time timers fire against the task's stream
time, which the engine keeps with the committed input offsets (docs/exactly-once.md#stream-time),
so replays fire them identically.
"""

from __future__ import annotations

from paysaga.tables.transaction import TableTransaction

_WIDTH = 15  # epoch milliseconds, zero-padded so byte order is time order


class KeyedTimers:
    """Durable timers, at most one per key, in one table (the engine's `Timer` declaration).

    Two entries per armed key: `d/<due>/<key>` in due order (what firing scans) and
    `r/<key>` -> due (so arming again moves the timer instead of adding a second one). Both
    are table writes, so arming, firing and the state change that caused them commit in one
    transaction and are restored from the changelog with the rest of the table.
    """

    def __init__(self, name: str) -> None:
        base = b"\x01k/" + name.encode() + b"/"
        self._by_due = base + b"d/"
        self._by_key = base + b"r/"

    def _due_key(self, due: int, key: bytes) -> bytes:
        return self._by_due + str(max(due, 0)).zfill(_WIDTH).encode() + b"/" + key

    def due_of(self, txn: TableTransaction, key: bytes) -> int | None:
        raw = txn.get(self._by_key + key)
        return None if raw is None else int(raw)

    def set(self, txn: TableTransaction, key: bytes, due: int) -> None:
        """Arm `key`'s timer at `due` (moving it if it was armed at another time)."""
        old = self.due_of(txn, key)
        if old == due:
            return
        if old is not None:
            txn.delete(self._due_key(old, key))
        txn.set(self._due_key(due, key), b"")
        txn.set(self._by_key + key, str(due).encode())

    def cancel(self, txn: TableTransaction, key: bytes) -> None:
        old = self.due_of(txn, key)
        if old is not None:
            txn.delete(self._due_key(old, key))
            txn.delete(self._by_key + key)

    def due(self, txn: TableTransaction, upto: int, limit: int = 500) -> list[tuple[int, bytes]]:
        """(due, key) of the timers due at or before `upto`, earliest first."""
        if upto < 0:
            return []
        hi = self._by_due + str(upto + 1).zfill(_WIDTH).encode()
        start = len(self._by_due)
        return [
            (int(k[start : start + _WIDTH]), k[start + _WIDTH + 1 :])
            for k, _ in txn.range(self._by_due, hi, limit)
        ]

    def next_due(self, txn: TableTransaction) -> int | None:
        """The earliest armed due time, or None when nothing is armed."""
        first = txn.range(self._by_due, self._by_due + b"\xff", 1)
        return None if not first else int(first[0][0][len(self._by_due) :][:_WIDTH])
