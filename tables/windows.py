"""Event-time windows kept inside a table, so they are changelogged and restored with it.

A `WindowStore` keeps, for one window name in one table partition, the aggregate of every
(key, window start) that is still open, plus a close index. Both live in the table under a
reserved 0x01 prefix (like `tables.timers`), so:

* every window write is part of the batch's `TableTransaction`: it reaches the changelog
  with the rest of the batch, inside the same Kafka transaction as the input offsets, and a
  rebuilt partition gets its open windows back from the changelog;
* closing a window (returning its final value and deleting it) happens in that same
  transaction, so a window closes exactly once: a batch that aborts loses the close together
  with its offsets and the replay closes the window again, a batch that commits deletes it.

Semantics follow Kafka Streams' `TimeWindows`:

* windows are epoch-aligned: window starts are multiples of `advance_ms`, a window covers
  ``start <= ts < start + size_ms`` (end exclusive), and starts are never negative;
  ``advance_ms == size_ms`` gives tumbling windows, a smaller advance hopping ones;
* a window *closes* when stream time reaches ``end + grace_ms``. A record whose window has
  closed (``end + grace_ms <= stream_time``) is *late*: that window is not updated and is
  reported in `Update.late` (the record still updates its other, open windows);
* closing is driven by stream time (the largest event time the task has seen, kept by the
  engine with its committed offsets), never by the wall clock, so a replay of the same
  records closes the same windows in the same order. Pass `update` the stream time after
  advancing it with the record, as Kafka Streams does.

Each store also remembers the highest stream time it has closed windows at, and treats that
as a floor for late detection: even if a caller passed a lower stream time later, a window
that was closed can never be re-created and closed twice.

Key layout (``N`` is the window name, times are zero-padded decimal milliseconds, so byte
order is time order, and user keys may hold any bytes, including ``/`` and NUL)::

    \\x01w/N/d/<escaped key><start>          -> aggregate      (data, grouped by key)
    \\x01w/N/c/<end+grace><start><raw key>   -> b""            (close index, in close order)
    \\x01w/N/m/closed                        -> stream time    (highest closing stream time)

The escaped key (NUL -> NUL 0xFF, then NUL NUL) keeps key order and is prefix-free, so the
windows of one key are one contiguous range; in the close index the key comes last, so
ties in close time are broken by start and then by key bytes. The same updates in the same
order produce byte-identical table contents.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from paysaga.tables.transaction import TableTransaction

_WIDTH = 15  # epoch milliseconds, zero-padded so byte order is time order (as tables.timers)
MAX_TIME = 10**_WIDTH - 1  #: the largest time (window end + grace) a key can hold
_AFTER_DIGITS = b":"  # the byte after b"9": an upper bound for "any time" in a range scan


def _time(t: int) -> bytes:
    return str(t).zfill(_WIDTH).encode()


def _escape(key: bytes) -> bytes:
    """Order-preserving, prefix-free encoding of a key (NUL escaped, NUL NUL terminated)."""
    return key.replace(b"\x00", b"\x00\xff") + b"\x00\x00"


@dataclass(frozen=True)
class Windows:
    """A window declaration: size, advance (hop) and grace period, in milliseconds."""

    size_ms: int
    advance_ms: int
    grace_ms: int = 0

    def __post_init__(self) -> None:
        for field, value in (
            ("size_ms", self.size_ms),
            ("advance_ms", self.advance_ms),
            ("grace_ms", self.grace_ms),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{field} must be an int, got {value!r}")
        if self.size_ms <= 0:
            raise ValueError(f"window size_ms must be positive, got {self.size_ms}")
        if not 0 < self.advance_ms <= self.size_ms:
            raise ValueError(
                f"window advance_ms must be in (0, size_ms={self.size_ms}], got {self.advance_ms}"
            )
        if self.grace_ms < 0:
            raise ValueError(f"window grace_ms must not be negative, got {self.grace_ms}")
        if self.size_ms + self.grace_ms > MAX_TIME:
            raise ValueError(f"window size_ms + grace_ms must not exceed {MAX_TIME}")

    @classmethod
    def tumbling(cls, size_ms: int, grace_ms: int = 0) -> Windows:
        """Non-overlapping windows ``[k*size, (k+1)*size)``."""
        return cls(size_ms, size_ms, grace_ms)

    @classmethod
    def hopping(cls, size_ms: int, advance_ms: int, grace_ms: int = 0) -> Windows:
        """Overlapping windows of `size_ms` starting every `advance_ms`."""
        return cls(size_ms, advance_ms, grace_ms)

    def containing(self, ts: int) -> list[int]:
        """Starts of the windows containing `ts` (start <= ts < start + size), ascending."""
        if ts < 0:
            raise ValueError(f"event time must not be negative, got {ts}")
        first = max(0, ts - self.size_ms + self.advance_ms) // self.advance_ms * self.advance_ms
        return list(range(first, ts + 1, self.advance_ms))

    def window(self, key: bytes, start: int) -> Window:
        return Window(key, start, start + self.size_ms)

    def close_time(self, start: int) -> int:
        """Stream time at which the window starting at `start` closes (end + grace)."""
        return start + self.size_ms + self.grace_ms


@dataclass(frozen=True)
class Window:
    """One window of one key: ``start <= ts < end``."""

    key: bytes
    start: int
    end: int


#: Computes a window's new aggregate from its current one (None for a new window).
Fold = Callable[[Window, bytes | None], bytes]


@dataclass(frozen=True)
class Update:
    """What one record did: the windows whose aggregate changed, and those it was late for."""

    updated: list[Window]
    late: list[Window]


class WindowStore:
    """The windows of one name in a table: aggregates per (key, window start) plus a close index."""

    def __init__(self, name: str, windows: Windows) -> None:
        if not name or "/" in name:
            raise ValueError(f"window store name must be non-empty without '/', got {name!r}")
        self.name = name
        self.windows = windows
        self.prefix = b"\x01w/" + name.encode() + b"/"
        self._data = self.prefix + b"d/"
        self._index = self.prefix + b"c/"
        self._closed_key = self.prefix + b"m/closed"

    # ---- keys -----------------------------------------------------------------------------

    def _data_key(self, key: bytes, start: int) -> bytes:
        return self._data + _escape(key) + _time(start)

    def _index_key(self, key: bytes, start: int) -> bytes:
        return self._index + _time(self.windows.close_time(start)) + _time(start) + key

    def next_close(self, txn: TableTransaction) -> int | None:
        """The earliest close time (end + grace) of an open window, or None if none is open
        (lets the engine skip `close_due` until stream time gets there)."""
        first = txn.range(self._index, self._index + _AFTER_DIGITS, 1)
        if not first:
            return None
        base = len(self._index)
        return int(first[0][0][base : base + _WIDTH])

    def closed_through(self, txn: TableTransaction) -> int:
        """Highest stream time this store has closed windows at (-1 if none yet)."""
        raw = txn.get(self._closed_key)
        return -1 if raw is None else int(raw)

    # ---- operations -----------------------------------------------------------------------

    def update(
        self, txn: TableTransaction, key: bytes, ts: int, stream_time: int, fold: Fold
    ) -> Update:
        """Fold a record at event time `ts` into every open window of `key` containing it.

        A window with ``end + grace <= stream_time`` is late: it is left alone and reported
        in `Update.late`. Otherwise its value becomes ``fold(window, current or None)``; the
        first write of a window also enters it in the close index. A fold that returns the
        current value writes nothing (no changelog record) and is not reported as updated.
        """
        if not isinstance(key, bytes):
            raise TypeError(f"window keys are bytes, got {type(key).__name__}")
        starts = self.windows.containing(ts)
        if starts and self.windows.close_time(starts[-1]) > MAX_TIME:
            raise ValueError(f"event time {ts} is beyond the largest storable time {MAX_TIME}")
        now = max(stream_time, self.closed_through(txn))
        updated: list[Window] = []
        late: list[Window] = []
        for start in starts:
            window = self.windows.window(key, start)
            if self.windows.close_time(start) <= now:
                late.append(window)
                continue
            data_key = self._data_key(key, start)
            current = txn.get(data_key)
            value = fold(window, current)
            if not isinstance(value, bytes):
                raise TypeError(f"a window fold must return bytes, got {type(value).__name__}")
            if value == current:
                continue
            txn.set(data_key, value)
            if current is None:
                txn.set(self._index_key(key, start), b"")
            updated.append(window)
        return Update(updated, late)

    def get(self, txn: TableTransaction, key: bytes, start: int) -> bytes | None:
        """The current aggregate of `key`'s window at `start`, or None (never written or
        already closed)."""
        return txn.get(self._data_key(key, start))

    def open_windows(
        self, txn: TableTransaction, key: bytes, limit: int = 1000
    ) -> list[tuple[Window, bytes]]:
        """`key`'s stored windows (written and not yet closed by `close_due`), by start."""
        lo = self._data + _escape(key)
        base = len(lo)
        return [
            (self.windows.window(key, int(k[base:])), value)
            for k, value in txn.range(lo, lo + _AFTER_DIGITS, limit)
        ]

    def close_due(
        self, txn: TableTransaction, stream_time: int, limit: int = 1000
    ) -> list[tuple[Window, bytes]]:
        """Close up to `limit` windows with ``end + grace <= stream_time``, each with its
        final value: earliest close first, ties by start, then key.

        Each window's value and index entry are deleted in `txn`, so once the transaction's
        writes are kept a window is never returned again (and a later record for it is
        late). Call again until it returns fewer than `limit` windows to close them all.
        """
        if stream_time < 0 or limit <= 0:
            return []
        hi = self._index + (_time(stream_time + 1) if stream_time < MAX_TIME else _AFTER_DIGITS)
        base = len(self._index)
        out: list[tuple[Window, bytes]] = []
        for index_key, _ in txn.range(self._index, hi, limit):
            start = int(index_key[base + _WIDTH : base + 2 * _WIDTH])
            key = index_key[base + 2 * _WIDTH :]
            data_key = self._data_key(key, start)
            value = txn.get(data_key)
            txn.delete(index_key)
            if value is None:  # an orphaned index entry: nothing to close
                continue
            txn.delete(data_key)
            out.append((self.windows.window(key, start), value))
        if out and stream_time > self.closed_through(txn):
            txn.set(self._closed_key, str(stream_time).encode())
        return out
