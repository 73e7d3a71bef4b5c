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
