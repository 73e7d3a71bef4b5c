"""Settlement batches: which batch a payment settles in, when the batch is submitted, and
what the batch and its lag add up to (docs/settlement.md).

A merchant's captured payments settle per (merchant, currency) batch: by default one batch
per UTC day of the event time at which the saga decided to settle (its completion), submitted
`cutoff_ms` after the day ends (captures of the day still on their way get in). A request
for a batch already submitted goes into the batch open at the partition's stream time: the
acquirer's "after the cut-off, tomorrow's batch". Pure: no Kafka, no Faust, integer minor
units and epoch millis only.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

from paysaga.domain.payment import derived_id
from paysaga.domain.reconciliation import DAY_MS, HOUR_MS


@dataclass(frozen=True)
class SettlementPolicy:
    """Batch length (event time), the cut-off after it, and how long closed batches stay
    queryable before their entries are purged."""

    batch_ms: int = DAY_MS
    cutoff_ms: int = HOUR_MS
    retention_ms: int = 7 * DAY_MS

    def __post_init__(self) -> None:
        if self.batch_ms <= 0 or self.cutoff_ms < 0 or self.retention_ms < 0:
            raise ValueError(f"invalid settlement policy {self}")

    def batch_start(self, ts: int) -> int:
        """Start of the epoch-aligned batch holding event time `ts`."""
        return ts - ts % self.batch_ms

    def due_at(self, start: int) -> int:
        """Stream time at which the batch starting at `start` is submitted."""
        return start + self.batch_ms + self.cutoff_ms

    def assign(self, ready_at: int, stream_time: int) -> int:
        """The batch (its start) a payment ready to settle at `ready_at` goes into, given the
        partition's stream time: its own batch, or, once that was submitted, the open one."""
        start = self.batch_start(ready_at)
        if self.due_at(start) <= stream_time:
            start = self.batch_start(stream_time)  # due after its end: still open
        return start

    def expected_due(self, ready_at: int) -> int:
        """When the batch of a payment ready at `ready_at` is submitted, if nothing is late:
        the saga's deadline for the settlement's answer starts from here."""
        return self.due_at(self.batch_start(ready_at))


def batch_id(merchant_id: str, currency: str, start: int) -> str:
    """Deterministic: a replay names the same batch the same way."""
    return derived_id("settlement", merchant_id, currency, str(start))


class Member(BaseModel):
    """One payment in a batch: what it settles and when it became ready."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    payment_id: str
    amount_minor: int
    ready_at: int


class LagStats(BaseModel):
    """Settlement lag (ready to submitted, event time) of a merchant's payments, in whole
    milliseconds: count, sum and maximum (a mean is sum // count; no floats)."""

    model_config = ConfigDict(extra="forbid")

    count: int = 0
    total_ms: int = 0
    max_ms: int = 0

    def add(self, lag_ms: int) -> None:
        lag_ms = max(0, lag_ms)
        self.count += 1
        self.total_ms += lag_ms
        self.max_ms = max(self.max_ms, lag_ms)

    def merged(self, other: LagStats) -> LagStats:
        """These waits and `other`'s together (a merchant's, after one more batch)."""
        return LagStats(count=self.count + other.count, total_ms=self.total_ms + other.total_ms,
                        max_ms=max(self.max_ms, other.max_ms))  # fmt: skip


__all__ = ["DAY_MS", "LagStats", "Member", "SettlementPolicy", "batch_id"]
