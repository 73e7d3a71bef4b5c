"""The `settlement` table: open and submitted batches by merchant, one RocksDB entry each.

Partition p holds the merchants whose id hashes to p (docs/settlement.md#state). Keys are
composite (`paysaga.tables.keyspace`), so a batch's members are one contiguous range::

    B <merchant> <currency> <start>          -> BatchSummary
    M <merchant> <currency> <start> <pid>    -> BatchEntry   (the SETTLE command's fields)
    I <merchant> <payment_id>                -> <start>      (each payment in one batch)
    G <merchant>                             -> LagStats     (settlement lag, per merchant)

Every write goes through the batch's `TableTransaction`, so it reaches the changelog in the
same Kafka transaction as the input offsets and the outputs it caused.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict

from paysaga.domain.settlement import LagStats, Member
from paysaga.tables.keyspace import SEP, check_part, key, scan
from paysaga.tables.transaction import TableTransaction

SETTLEMENT = "settlement"


class BatchSummary(BaseModel):
    """Running totals of one batch, and whether it was submitted."""

    model_config = ConfigDict(extra="forbid")

    member_count: int = 0
    total_minor: int = 0
    submitted: bool = False


class BatchEntry(BaseModel):
    """A member and the SETTLE command that goes to the gateway when its batch is submitted."""

    model_config = ConfigDict(extra="forbid")

    member: Member
    command: dict[str, Any]


class SettlementBook:
    """Typed reads and writes of the `settlement` table within one batch of input."""

    def __init__(self, table: TableTransaction) -> None:
        self.t = table

    def batch_of(self, merchant: str, payment_id: str) -> int | None:
        raw = self.t.get(key(b"I", merchant, payment_id))
        return None if raw is None else int(raw)

    def summary(self, bid: bytes) -> BatchSummary:
        raw = self.t.get(b"B" + SEP + bid)
        return BatchSummary() if raw is None else BatchSummary.model_validate_json(raw)

    def put_summary(self, bid: bytes, s: BatchSummary) -> None:
        self.t.set(b"B" + SEP + bid, s.model_dump_json().encode())

    def add(self, bid: bytes, merchant: str, start: int, e: BatchEntry) -> None:
        pid = e.member.payment_id
        self.t.set(self._member_key(bid, pid), e.model_dump_json().encode())
        self.t.set(key(b"I", merchant, pid), str(start).encode())

    def entries(self, bid: bytes) -> Iterator[BatchEntry]:
        """The batch's members in payment id order (deterministic)."""
        for _, raw in scan(self.t, b"M" + SEP + bid + SEP):
            yield BatchEntry.model_validate_json(raw)

    def purge(self, bid: bytes, merchant: str) -> int:
        """Forget a submitted batch: its summary, members and payment index. Returns how
        many members it held."""
        n = 0
        for k, raw in list(scan(self.t, b"M" + SEP + bid + SEP)):
            pid = BatchEntry.model_validate_json(raw).member.payment_id
            self.t.delete(k)
            self.t.delete(key(b"I", merchant, pid))
            n += 1
        self.t.delete(b"B" + SEP + bid)
        return n

    def lag(self, merchant: str) -> LagStats:
        raw = self.t.get(key(b"G", merchant))
        return LagStats() if raw is None else LagStats.model_validate_json(raw)

    def put_lag(self, merchant: str, stats: LagStats) -> None:
        self.t.set(key(b"G", merchant), stats.model_dump_json().encode())

    @staticmethod
    def _member_key(bid: bytes, payment_id: str) -> bytes:
        return b"M" + SEP + bid + SEP + check_part(payment_id)
