"""Timers and stream time kept inside a table, so they are changelogged like its data.

A timer index maps `prefix + due + "/" + id` to nothing; scanning it from the prefix up to
"now" finds every due id in order, without touching the rest of the table (Kafka Streams'
punctuation over a store, in a key range). Stream time is the largest event time a table
partition has seen; event-time timers fire against it, so replays fire them identically.
"""

from __future__ import annotations

from paysaga.tables.transaction import TableTransaction

_WIDTH = 15  # epoch milliseconds, zero-padded so byte order is time order
STREAM_TIME_KEY = b"\x01stream_time"


class TimerIndex:
    """Due times of ids, in one table, under a one-byte-namespaced prefix."""

    def __init__(self, name: str) -> None:
        self.prefix = b"\x01t/" + name.encode() + b"/"

    def _key(self, due: int, ident: bytes) -> bytes:
        return self.prefix + str(due).zfill(_WIDTH).encode() + b"/" + ident

    def move(self, txn: TableTransaction, ident: bytes, old: int | None, new: int | None) -> None:
        """Replace the timer of `ident` at `old` (if any) by one at `new` (if any)."""
        if old == new:
            return
        if old is not None:
            txn.delete(self._key(old, ident))
        if new is not None:
            txn.set(self._key(new, ident), b"")

    def due(self, txn: TableTransaction, upto: int, limit: int = 500) -> list[tuple[int, bytes]]:
        """(due, id) of timers due at or before `upto`, earliest first."""
        hi = self.prefix + str(upto + 1).zfill(_WIDTH).encode()
        start = len(self.prefix)
        return [
            (int(key[start : start + _WIDTH]), key[start + _WIDTH + 1 :])
            for key, _ in txn.range(self.prefix, hi, limit)
        ]


def stream_time(txn: TableTransaction) -> int:
    raw = txn.get(STREAM_TIME_KEY)
    return -1 if raw is None else int(raw)


def advance_stream_time(txn: TableTransaction, event_time: int) -> int:
    """Raise the partition's stream time to `event_time` if later; return the new value."""
    current = stream_time(txn)
    if event_time > current:
        txn.set(STREAM_TIME_KEY, str(event_time).encode())
        return event_time
    return current


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
