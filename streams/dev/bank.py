"""A bank statement feed for reconciliation (`paysaga simulate bank`).

It reads what the gateway captured and refunded (`payment.captured`, `payment.reversed`,
read_committed, its own consumer group `<prefix>paysaga-sim-bank`) and writes a
`BankStatementLine` per capture (a CREDIT naming its gateway reference) and per refund (a
DEBIT naming its payment) to `bank.statements`, keyed by merchant, `lag_ms` after it (wall
clock and event time: a line is held until it is due, as a bank reports later).
Discrepancies are injected at configured rates, one fate per movement (`line_fate`): a
missing line, a wrong amount, a wrong currency, a duplicate line, a late line (`late_ms`
after the movement: past its window's close, an adjustment), a line without a reference
(matched by amount); and, independently, an extra line for no movement. Everything is
decided by the seed and the capture or reversal id alone (never Python's salted `hash()`),
so a movement seen twice (a re-answered command) gives byte-identical lines, which
reconciliation counts once.

Offsets are committed only up to the first capture whose lines are not all sent yet
(at-least-once, held lines included); a restart sends a held line again, the same bytes.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, fields
from typing import Any, TextIO

from aiokafka import AIOKafkaProducer
from aiokafka.errors import CommitFailedError
from aiokafka.structs import TopicPartition

from paysaga.domain.payment import derived_id
from paysaga.domain.reconciliation import utc_date
from paysaga.schemas.codec import AvroCodec, DecodeError
from paysaga.schemas.registry import SchemaRegistry
from paysaga.streams.app.kafka_io import consumer as make_consumer
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import Topics
from paysaga.streams.dev.simulators import BATCH_MAX, _check_rates, _rng, _StatsLine
from paysaga.streams.engine.partitioner import partition_for

log = logging.getLogger(__name__)

#: The fates a capture's statement line can have (besides "ok"), in the order rolled.
FATES = ("missing", "misstated", "currency", "duplicate", "late", "unreferenced")
OTHER_CURRENCY = {"EUR": "USD", "USD": "EUR"}


@dataclass(frozen=True)
class BankConfig:
    """The statement feed: lag, injected discrepancies, latency and the decisions' seed."""

    lag_ms: int = 2_000
    missing_rate: float = 0.01
    #: A line whose amount is misstated (wrong), a share of captures like every rate here.
    misstated_rate: float = 0.005
    currency_rate: float = 0.002
    duplicate_rate: float = 0.003
    late_rate: float = 0.002
    unreferenced_rate: float = 0.005
    extra_rate: float = 0.003
    #: How long after its capture a late line comes: past the window's end plus grace.
    late_ms: int = 180_000
    latency_ms: int = 5
    seed: int = 1

    def __post_init__(self) -> None:
        _check_rates(self, *(f"{f}_rate" for f in FATES), "extra_rate")
        if sum(getattr(self, f"{f}_rate") for f in FATES) > 1.0:
            raise ValueError("the fates' rates must not add up to more than 1")
        if self.lag_ms < 0 or self.late_ms < self.lag_ms:
            raise ValueError("lag_ms must be >= 0 and late_ms >= lag_ms")


def bank_config(**options: Any) -> BankConfig:
    """A BankConfig from options; None values and unknown names are ignored."""
    names = {f.name for f in fields(BankConfig)}
    return BankConfig(**{k: v for k, v in options.items() if k in names and v is not None})


def line_fate(config: BankConfig, capture_id: str) -> str:
    """What happens to a capture's statement line: "ok" or one of `FATES`."""
    roll = _rng(config.seed, capture_id, "fate").random()
    for fate in FATES:
        roll -= getattr(config, f"{fate}_rate")
        if roll < 0:
            return fate
    return "ok"


def statement_lines(
    config: BankConfig, cap: dict[str, Any]
) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """(due wall-clock ms, BankStatementLine record) for one capture, and the labels of
    what was injected ("ok" for a faithful line)."""
    cid, merchant = cap["capture_id"], cap["merchant_id"]
    rng = _rng(config.seed, cid, "line")
    fate = line_fate(config, cid)
    labels = [fate]
    at = cap["occurred_at"] + (config.late_ms if fate == "late" else config.lag_ms)

    def line(tag: str, **changes: Any) -> dict[str, Any]:
        rec = {"event_id": derived_id("bank", cid, tag), "occurred_at": at,
               "statement_id": f"st-{merchant}-{utc_date(at)}", "line_id": f"{cid}{tag}",
               "merchant_id": merchant, "payment_reference": cap["gateway_reference"],
               "amount_minor": cap["amount_minor"], "currency": cap["currency"],
               "value_date": utc_date(cap["occurred_at"]), "booking_date": utc_date(at),
               "direction": cap.get("direction", "CREDIT")}  # fmt: skip
        return rec | changes

    out: list[dict[str, Any]] = []
    if fate == "misstated":
        out.append(line("", amount_minor=cap["amount_minor"] + rng.randint(1, 99)))
    elif fate == "currency":
        out.append(line("", currency=OTHER_CURRENCY.get(cap["currency"], "EUR")))
    elif fate == "duplicate":
        out += [line(""), line("-dup")]
    elif fate == "unreferenced":
        out.append(line("", payment_reference=None))
    elif fate != "missing":
        out.append(line(""))
    if _rng(config.seed, cid, "extra").random() < config.extra_rate:
        labels.append("extra")
        out.append(line("-extra", payment_reference=f"unknown-{cid}",
                        amount_minor=rng.randint(100, 99_999)))  # fmt: skip
    return [(at, rec) for rec in out], labels


async def run_bank(settings: Settings, config: BankConfig | None = None,
                   stop: asyncio.Event | None = None,
                   stats_out: TextIO | None = sys.stderr) -> Counter[str]:  # fmt: skip
    """Run the feed until `stop` is set. Returns the counters (captures, lines, and one per
    injected label)."""
    config = config or BankConfig()
    topics = Topics(settings.topic_prefix)
    stop = stop or asyncio.Event()
    codec = AvroCodec(SchemaRegistry())
    stats: Counter[str] = Counter()
    held: list[tuple[int, int, TopicPartition, int, bytes, bytes]] = []  # due, seq, source
    unsent: dict[TopicPartition, Counter[int]] = {}  # lines still held, per capture offset
    consumed: dict[TopicPartition, int] = {}
    seq = 0
    line = _StatsLine(0, "sim bank", stats_out) if stats_out is not None else None
    if line is not None:
        line.unit = "captures"
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, client_id="paysaga-sim-bank",
                                acks="all", enable_idempotence=True, linger_ms=2)  # fmt: skip
    partitions = settings.partitions

    def summary() -> str:
        return " ".join(f"{k}={v}" for k, v in sorted(stats.items()) if k != "captures")

    def movement(r: Any) -> dict[str, Any] | None:
        """The money movement a record is, as `statement_lines` takes it; None for a void
        (no money moves) or a record that cannot be read (counted and logged)."""
        refund = r.topic == topics.reversed
        try:
            rec = codec.decode(r.value or b"", "PaymentReversed" if refund else "PaymentCaptured")
        except DecodeError as exc:
            stats["undecodable"] += 1
            log.warning("sim bank: skipped an undecodable record at %s[%d]@%d: %s", r.topic,
                        r.partition, r.offset, exc.reason)  # fmt: skip
            return None
        if not refund:
            stats["captures"] += 1
            return rec
        if rec["kind"] != "REFUND":
            return None
        if rec.get("merchant_id") is None:
            stats["refunds without merchant"] += 1
            return None
        stats["refunds"] += 1
        return {"capture_id": rec["reversal_id"], "merchant_id": rec["merchant_id"],
                "occurred_at": rec["occurred_at"], "gateway_reference": rec["payment_id"],
                "amount_minor": rec["amount_minor"], "currency": rec["currency"],
                "direction": "DEBIT"}  # fmt: skip

    async def send_due() -> None:
        now = int(time.time() * 1000)
        pending = []
        while held and held[0][0] <= now:
            _, _, tp, offset, key, value = heapq.heappop(held)
            part = partition_for(key, partitions)
            pending.append(await producer.send(topics.bank_statements, value, key=key,
                                               partition=part))  # fmt: skip
            unsent[tp][offset] -= 1
        await asyncio.gather(*pending)
        stats["lines"] += len(pending)

    def commit_positions() -> dict[TopicPartition, int]:
        out = {}
        for tp, upto in consumed.items():
            waiting = [o for o, n in unsent.get(tp, Counter()).items() if n > 0]
            out[tp] = min(waiting) if waiting else upto
            unsent[tp] = Counter({o: n for o, n in unsent.get(tp, Counter()).items() if n > 0})
        return out

    try:
        await producer.start()
        group = f"{settings.topic_prefix}paysaga-sim-bank"
        cons = make_consumer(settings.bootstrap, group_id=group, client_id="paysaga-sim-bank")
        try:
            await cons.start()
            cons.subscribe([topics.captured, topics.reversed])
            while not stop.is_set():
                batch = await cons.getmany(timeout_ms=200, max_records=BATCH_MAX)
                for tp, records in batch.items():
                    for r in records:
                        cap = movement(r)
                        if cap is None:
                            consumed[tp] = r.offset + 1
                            continue
                        lines, labels = statement_lines(config, cap)
                        stats.update(labels)
                        for due, rec in lines:
                            seq += 1
                            value = codec.encode("BankStatementLine", rec)
                            heapq.heappush(
                                held, (due, seq, tp, r.offset, rec["merchant_id"].encode(), value)
                            )
                            unsent.setdefault(tp, Counter())[r.offset] += 1
                        consumed[tp] = r.offset + 1
                if batch and config.latency_ms:
                    await asyncio.sleep(config.latency_ms / 1000)
                await send_due()
                if consumed:
                    try:
                        await cons.commit(commit_positions())
                    except CommitFailedError as exc:  # a rebalance: redelivered, same bytes
                        stats["commit_failed"] += 1
                        log.warning("sim bank: offset commit failed (%s)", exc)
                if line is not None:
                    line.update(stats["captures"], summary())
        finally:
            await cons.stop()
    finally:
        await producer.stop()
        if line is not None:
            line.close(stats["captures"], summary())
    return stats


def run_bank_until_signalled(settings: Settings, config: BankConfig) -> Counter[str]:
    """Run the feed in the foreground until SIGINT or SIGTERM (the CLI)."""

    async def main() -> Counter[str]:
        stop = asyncio.Event()
        aloop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            aloop.add_signal_handler(sig, stop.set)
        return await run_bank(settings, config, stop)

    return asyncio.run(main())
