"""The `recon` table: reconciliation entries by merchant, one RocksDB entry each.

Partition p holds the merchants whose id hashes to p (docs/reconciliation.md#state). Keys
start with a one-letter kind, then NUL-separated parts (ids never hold NUL: `check_part`),
so the entries of one window are one contiguous range and a close reads only them::

    M <merchant> <movement_id>                  -> MovementEntry   (a capture or refund)
    L <merchant> <line_key>                     -> LineEntry       (a bank line)
    R <merchant> <reference>                    -> [movement_id]   (gateway ref, payment id)
    P <merchant> <reference>                    -> [line_key]      (lines waiting for it)
    W <merchant> <currency> <start>             -> WindowSummary
    O <merchant> <currency> <start> m|l <id>    -> b"" unmatched (for the close), b"a"
                                                   accounted: every entry of the window,
                                                   for its purge after the retention
    D <merchant> <currency> <start> <disc. id>  -> Discrepancy     (open problems)

Every write goes through the batch's `TableTransaction`, so it reaches the changelog in the
same Kafka transaction as the input offsets and the outputs it caused.
"""

from __future__ import annotations

from collections.abc import Iterator

from pydantic import BaseModel, ConfigDict, Field

from paysaga.domain.reconciliation import Category, Discrepancy, Line, Movement
from paysaga.tables.keyspace import SEP, check_part, key, scan
from paysaga.tables.transaction import TableTransaction

RECON = "recon"
_OPEN, _ACCOUNTED = b"", b"a"


class MovementEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    movement: Movement
    merchant_id: str
    window_start: int
    #: None: unmatched; else MATCHED or the tier-1 discrepancy category that accounts for it.
    state: Category | None = None
    line_key: str | None = None


class LineEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    line: Line
    merchant_id: str
    #: The window (currency, start) the line is accounted in.
    currency: str
    window_start: int
    state: Category | None = None
    movement_id: str | None = None


class WindowSummary(BaseModel):
    """Counters of one window, kept as entries arrive, and where its reporting stands."""

    model_config = ConfigDict(extra="forbid")

    internal_count: int = 0
    internal_minor: int = 0
    bank_count: int = 0
    bank_minor: int = 0
    matched_count: int = 0
    matched_minor: int = 0
    #: 0 while open; the last report revision emitted once closed.
    revision: int = 0
    #: Categories of discrepancies resolved by the revision being built (reset per report).
    resolved: list[str] = Field(default_factory=list)

    @property
    def closed(self) -> bool:
        return self.revision > 0


class ReconBook:
    """Typed reads and writes of the `recon` table within one batch."""

    def __init__(self, table: TableTransaction) -> None:
        self.t = table

    # ---- movements and lines ------------------------------------------------------------
    def movement(self, merchant: str, movement_id: str) -> MovementEntry | None:
        raw = self.t.get(key(b"M", merchant, movement_id))
        return None if raw is None else MovementEntry.model_validate_json(raw)

    def put_movement(self, e: MovementEntry) -> None:
        self.t.set(key(b"M", e.merchant_id, e.movement.movement_id), e.model_dump_json().encode())

    def line(self, merchant: str, line_key: str) -> LineEntry | None:
        raw = self.t.get(key(b"L", merchant, line_key))
        return None if raw is None else LineEntry.model_validate_json(raw)

    def put_line(self, e: LineEntry) -> None:
        self.t.set(key(b"L", e.merchant_id, e.line.line_key), e.model_dump_json().encode())

    # ---- the reference index ------------------------------------------------------------
    def named(self, merchant: str, reference: str) -> list[str]:
        raw = self.t.get(key(b"R", merchant, reference))
        return [] if raw is None else raw.decode().split("\n")

    def index(self, merchant: str, reference: str, movement_id: str) -> None:
        ids = self.named(merchant, reference)
        if movement_id not in ids:
            ids.append(movement_id)
            self.t.set(key(b"R", merchant, reference), "\n".join(sorted(ids)).encode())

    # ---- lines waiting for the movement their reference names --------------------------
    def waiting(self, merchant: str, reference: str) -> list[str]:
        raw = self.t.get(key(b"P", merchant, reference))
        return [] if raw is None else raw.decode().split("\n")

    def wait(self, merchant: str, reference: str, line_key: str) -> None:
        keys = self.waiting(merchant, reference)
        if line_key not in keys:
            keys.append(line_key)
            self.t.set(key(b"P", merchant, reference), "\n".join(sorted(keys)).encode())

    def unwait(self, merchant: str, reference: str, line_key: str) -> None:
        keys = [k for k in self.waiting(merchant, reference) if k != line_key]
        if keys:
            self.t.set(key(b"P", merchant, reference), "\n".join(keys).encode())
        else:
            self.t.delete(key(b"P", merchant, reference))

    # ---- windows ------------------------------------------------------------------------
    def summary(self, wid: bytes) -> WindowSummary:
        raw = self.t.get(b"W" + SEP + wid)
        return WindowSummary() if raw is None else WindowSummary.model_validate_json(raw)

    def put_summary(self, wid: bytes, s: WindowSummary) -> None:
        self.t.set(b"W" + SEP + wid, s.model_dump_json().encode())

    def drop_summary(self, wid: bytes) -> None:
        self.t.delete(b"W" + SEP + wid)

    def mark_open(self, wid: bytes, side: bytes, entry_id: str, is_open: bool) -> None:
        """Record an entry as the window's: unmatched (`is_open`, for the close) or
        accounted (matched, or reported). Either way it is the window's, for its purge."""
        key = b"O" + SEP + wid + SEP + side + SEP + check_part(entry_id)
        self.t.set(key, _OPEN if is_open else _ACCOUNTED)

    def leave(self, wid: bytes, side: bytes, entry_id: str) -> None:
        """The entry is no longer the window's (a waiting line moved to its movement's)."""
        self.t.delete(b"O" + SEP + wid + SEP + side + SEP + check_part(entry_id))

    def open_ids(self, wid: bytes, side: bytes) -> Iterator[str]:
        """Ids of the window's unmatched movements (side b"m") or lines (b"l"), in order."""
        for entry_id, state in self._members(wid, side):
            if state == _OPEN:
                yield entry_id

    def _members(self, wid: bytes, side: bytes) -> Iterator[tuple[str, bytes]]:
        prefix = b"O" + SEP + wid + SEP + side + SEP
        for k, v in self._scan(prefix):
            yield k[len(prefix) :].decode(), v

    def purge(self, wid: bytes, merchant: str) -> int:
        """Forget a closed window past its retention: its movements and lines with their
        reference and waiting indexes, its problems and its summary. Returns the entries
        forgotten."""
        n = 0
        for mid, _ in list(self._members(wid, b"m")):
            e = self.movement(merchant, mid)
            if e is not None:
                for ref in {e.movement.reference, e.movement.payment_id}:
                    ids = [i for i in self.named(merchant, ref) if i != mid]
                    rkey = key(b"R", merchant, ref)
                    if ids:
                        self.t.set(rkey, "\n".join(ids).encode())
                    else:
                        self.t.delete(rkey)
                self.t.delete(key(b"M", merchant, mid))
            self.leave(wid, b"m", mid)
            n += 1
        for line_key, _ in list(self._members(wid, b"l")):
            le = self.line(merchant, line_key)
            if le is not None:
                if le.line.reference is not None:
                    self.unwait(merchant, le.line.reference, line_key)
                self.t.delete(key(b"L", merchant, line_key))
            self.leave(wid, b"l", line_key)
            n += 1
        for k, _ in list(self._scan(b"D" + SEP + wid + SEP)):
            self.t.delete(k)
        self.drop_summary(wid)
        return n

    def add_discrepancy(self, wid: bytes, d: Discrepancy) -> None:
        self.t.set(self._disc_key(wid, d.discrepancy_id), d.model_dump_json().encode())

    def drop_discrepancy(self, wid: bytes, discrepancy_id: str) -> Discrepancy | None:
        key = self._disc_key(wid, discrepancy_id)
        raw = self.t.get(key)
        if raw is None:
            return None
        self.t.delete(key)
        return Discrepancy.model_validate_json(raw)

    def discrepancies(self, wid: bytes) -> Iterator[Discrepancy]:
        for _, raw in self._scan(b"D" + SEP + wid + SEP):
            yield Discrepancy.model_validate_json(raw)

    @staticmethod
    def _disc_key(wid: bytes, discrepancy_id: str) -> bytes:
        return b"D" + SEP + wid + SEP + check_part(discrepancy_id)

    def _scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        return scan(self.t, prefix)
