"""Views folded from output topics rather than tables: `/dlq` and `/reconciliation/...`.

Dead letters and reconciliation reports are outputs, not state a task owns, so any worker
answers them alike, from the committed records (read_committed). A `TopicFollower` keeps
one group-less consumer per view and, on each request, reads from where it stopped up to
the end offsets as of that request, so an answer includes everything committed before it
was asked and a request costs only the records that are new since the last one.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord
from pydantic import BaseModel

from paysaga.domain.card import redact
from paysaga.schemas.codec import AvroCodec, DecodeError
from paysaga.streams.app.kafka_io import consumer, partitions
from paysaga.streams.engine.deadletter import (
    H_REASON,
    parse_headers,
)
from paysaga.streams.ops.api_models import utc_iso
from paysaga.streams.ops.recon_view import WindowView, collect
from paysaga.streams.ops.redrive import letter_of

#: Letters `/dlq` lists, newest last.
RECENT_LETTERS = 50
#: Windows `/reconciliation/{merchant}/{currency}` lists, newest first.
RECENT_WINDOWS = 24


class TopicFollower:
    """Reads `topics` from the beginning, once, folding each committed record with
    `fold`; `catch_up` reads what is new up to the end offsets of the moment."""

    def __init__(self, bootstrap: str, topics: list[str],
                 fold: Callable[[ConsumerRecord], None]) -> None:  # fmt: skip
        self.bootstrap, self.topics, self.fold = bootstrap, topics, fold
        self._consumer: AIOKafkaConsumer | None = None
        self._tps: list[TopicPartition] = []
        self._lock = asyncio.Lock()

    async def _start(self) -> AIOKafkaConsumer:
        c = consumer(self.bootstrap)
        await c.start()
        tps = [tp for t in self.topics for tp in await partitions(c, t)]
        if not tps:
            await c.stop()
            raise LookupError(f"no partitions for {self.topics}: were the topics created?")
        c.assign(tps)
        for tp, offset in (await c.beginning_offsets(tps)).items():
            c.seek(tp, offset)
        self._consumer, self._tps = c, tps
        return c

    async def catch_up(self, timeout_s: float) -> None:
        """Fold every record committed before now; TimeoutError if that takes too long."""
        async with self._lock:
            c = self._consumer or await self._start()
            end = await c.end_offsets(self._tps)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            while [tp for tp in self._tps if await c.position(tp) < end[tp]]:
                if loop.time() > deadline:
                    raise TimeoutError(f"reading {self.topics} took over {timeout_s}s")
                batch = await c.getmany(timeout_ms=100, max_records=5000)
                for records in batch.values():
                    for r in records:
                        self.fold(r)

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None


class LetterSummary(BaseModel):
    """One dead letter without its payload: where it came from, why, how often redriven."""

    ref: str
    kind: str
    error_class: str
    topic: str
    partition: int
    offset: int
    reason: str
    failed_at: int | None
    failed_at_utc: str | None
    redrive_count: int
    value_bytes: int


class DlqView(BaseModel):
    """`GET /dlq`: counts by kind and by error class, and the latest letters."""

    total: int
    by_kind: dict[str, int]
    by_error_class: dict[str, int]
    recent: list[LetterSummary]


class DlqFold:
    def __init__(self) -> None:
        self.total = 0
        self.by_kind: Counter[str] = Counter()
        self.by_class: Counter[str] = Counter()
        self.recent: deque[LetterSummary] = deque(maxlen=RECENT_LETTERS)

    def __call__(self, record: ConsumerRecord) -> None:
        letter = letter_of(record)
        self.total += 1
        self.by_kind[letter.kind] += 1
        self.by_class[letter.error_class] += 1
        reason = redact(parse_headers(letter.headers).get(H_REASON, ""))
        self.recent.append(LetterSummary(
            ref=letter.ref, kind=letter.kind, error_class=letter.error_class,
            topic=letter.source.topic, partition=letter.source.partition,
            offset=letter.source.offset, reason=reason, failed_at=letter.last_failed_at,
            failed_at_utc=utc_iso(letter.last_failed_at), redrive_count=letter.redrive_count,
            value_bytes=len(letter.value or b""),
        ))  # fmt: skip

    def view(self) -> DlqView:
        return DlqView(total=self.total, by_kind=dict(self.by_kind),
                       by_error_class=dict(self.by_class), recent=list(self.recent))  # fmt: skip


class ReconWindowSummary(BaseModel):
    """A reconciliation window as its latest report revision states it (minor units)."""

    merchant_id: str
    currency: str
    window_start: int
    window_start_utc: str | None
    window_end: int
    revision: int
    internal_count: int
    internal_minor: int
    bank_count: int
    bank_minor: int
    matched_count: int
    matched_minor: int
    open_discrepancies: int
    resolved_discrepancies: int


class ReconWindows(BaseModel):
    """`GET /reconciliation/{merchant_id}/{currency}`: the latest windows, newest first."""

    merchant_id: str
    currency: str
    windows: list[ReconWindowSummary]


class ReconWindowDetail(ReconWindowSummary):
    """`GET /reconciliation/{merchant_id}/{currency}/{window_start}`: one window, every
    revision seen, its categories and its discrepancies (latest record of each)."""

    revisions: list[int]
    category_counts: dict[str, int]
    category_sums: dict[str, int]
    discrepancies: list[dict[str, Any]]


def summary(v: WindowView) -> dict[str, Any]:
    r = v.report
    resolved = sum(1 for d in v.discrepancies.values() if d["status"] == "RESOLVED")
    return {
        "merchant_id": r["merchant_id"], "currency": r["currency"],
        "window_start": r["window_start"], "window_start_utc": utc_iso(r["window_start"]),
        "window_end": r["window_end"], "revision": r["revision"],
        "internal_count": r["internal_count"], "internal_minor": r["internal_minor"],
        "bank_count": r["bank_count"], "bank_minor": r["bank_minor"],
        "matched_count": r["matched_count"], "matched_minor": r["matched_minor"],
        "open_discrepancies": len(v.open), "resolved_discrepancies": resolved,
    }  # fmt: skip


class ReconFold:
    """Reports and discrepancies in topic order, decoded; windows rebuilt by the same rules
    as `paysaga recon list` (streams/ops/recon_view.py `collect`)."""

    def __init__(self, codec: AvroCodec, reports_topic: str) -> None:
        self.codec, self.reports_topic = codec, reports_topic
        self.reports: list[dict[str, Any]] = []
        self.problems: list[dict[str, Any]] = []
        self.undecodable = 0

    def __call__(self, record: ConsumerRecord) -> None:
        report = record.topic == self.reports_topic
        try:
            value = self.codec.decode(
                record.value or b"", "ReconciliationReport" if report else
                "ReconciliationDiscrepancy")  # fmt: skip
        except DecodeError:
            self.undecodable += 1
            return
        (self.reports if report else self.problems).append(value)

    def windows(self, merchant: str, currency: str) -> ReconWindows:
        views = collect(self.reports, self.problems)
        keys = sorted((k for k in views if k[:2] == (merchant, currency)), key=lambda k: -k[2])
        rows = [ReconWindowSummary(**summary(views[k])) for k in keys[:RECENT_WINDOWS]]
        return ReconWindows(merchant_id=redact(merchant), currency=redact(currency), windows=rows)

    def window(self, merchant: str, currency: str, start: int) -> ReconWindowDetail | None:
        v = collect(self.reports, self.problems).get((merchant, currency, start))
        if v is None:
            return None
        r = v.report
        found = sorted(v.discrepancies.values(), key=lambda d: (d["status"], d["kind"],
                                                                 d["discrepancy_id"]))  # fmt: skip
        return ReconWindowDetail(**summary(v), revisions=v.revisions,
                                 category_counts=r["category_counts"],
                                 category_sums=r["category_sums"], discrepancies=found)  # fmt: skip
