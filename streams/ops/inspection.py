"""Operator read-outs: the DLQ list and detail, and the live outcome counter (`watch`)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from typing import TextIO

from paysaga.schemas.codec import AvroCodec, DecodeError
from paysaga.schemas.registry import SchemaRegistry
from paysaga.streams.app.kafka_io import iter_records, read_all
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import Topics
from paysaga.streams.engine.deadletter import (
    H_ERROR_CLASS,
    H_FAILED_AT,
    H_FIRST_FAILED_AT,
    H_KIND,
    H_LAST_FAILED_AT,
    H_OFFSET,
    H_ORIGIN_FIRST_FAILED_AT,
    H_PARTITION,
    H_REASON,
    H_REDRIVE_COUNT,
    H_TOPIC,
    ORIGINAL_PREFIX,
    default_error_class,
    parse_headers,
)

#: Headers holding epoch millis: `dlq show` adds the time in UTC.
_TIMES = (H_FIRST_FAILED_AT, H_LAST_FAILED_AT, H_FAILED_AT, H_ORIGIN_FIRST_FAILED_AT)


def utc(ms: str | int | None) -> str:
    """Epoch millis as an ISO 8601 UTC time (`?` when absent or unreadable)."""
    try:
        at = datetime.fromtimestamp(int("" if ms is None else ms) / 1000, UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return "?"
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


async def dlq_list(settings: Settings, limit: int = 50) -> int:
    records = await read_all(settings.bootstrap, Topics(settings.topic_prefix).dlq)
    kinds = Counter(parse_headers(r.headers).get(H_KIND, "?") for r in records)
    print(f"{len(records)} dead letters: " + ", ".join(f"{k}={n}" for k, n in kinds.items()))
    for r in records[-limit:]:
        h = parse_headers(r.headers)
        kind = h.get(H_KIND, "?")
        klass = h.get(H_ERROR_CLASS) or default_error_class(kind)
        last = utc(h.get(H_LAST_FAILED_AT) or h.get(H_FAILED_AT))
        print(
            f"{r.partition}:{r.offset}  {kind:<10} {klass:<9} {last}  "
            f"redrives={h.get(H_REDRIVE_COUNT, '0')} from "
            f"{h.get(H_TOPIC)}[{h.get(H_PARTITION)}]@{h.get(H_OFFSET)}  {h.get(H_REASON)}"
        )
    return 0


async def dlq_show(settings: Settings, ref: str) -> int:
    """One letter's headers (times also in UTC). The payload and the input's own header
    values are never printed, only their sizes: they are the upstream's bytes."""
    try:
        part, offset = (int(x) for x in ref.split(":"))
    except ValueError:
        print(f"error: expected PARTITION:OFFSET, got {ref!r}", file=sys.stderr)
        return 2
    for r in await read_all(settings.bootstrap, Topics(settings.topic_prefix).dlq):
        if (r.partition, r.offset) == (part, offset):
            h = parse_headers(r.headers)
            kind = h.get(H_KIND, "?")
            if H_ERROR_CLASS not in h:
                print(f"{H_ERROR_CLASS}: {default_error_class(kind)} (by kind)")
            for k, v in r.headers or ():
                if k.startswith(ORIGINAL_PREFIX):
                    print(f"{k}: {len(v)} bytes (original header, not printed)")
                elif k in _TIMES:
                    print(f"{k}: {v.decode('utf-8', 'replace')} ({utc(h[k])})")
                else:
                    print(f"{k}: {v.decode('utf-8', 'replace')}")
            if H_REDRIVE_COUNT not in h:
                print(f"{H_REDRIVE_COUNT}: 0 (never redriven)")
            size = len(r.value or b"")
            print(f"key: {r.key!r}\nvalue: {size} bytes (original payload, not printed)")
            return 0
    print(f"error: no dead letter at {ref}", file=sys.stderr)
    return 1


def _recon_label(codec: AvroCodec, report: bool, value: bytes | None) -> str:
    """The watch line's counter for one reconciliation record."""
    try:
        if report:
            rec = codec.decode(value or b"", "ReconciliationReport")
            return "recon windows" if rec["revision"] == 1 else "recon revisions"
        rec = codec.decode(value or b"", "ReconciliationDiscrepancy")
    except DecodeError:
        return "undecodable recon"
    return "recon resolved" if rec["status"] == "RESOLVED" else f"recon {rec['kind']}"


async def watch(settings: Settings, seconds: float = 0.0, out: TextIO = sys.stdout) -> int:
    """Print live counts of status outcomes, dead letters, retries scheduled per level,
    reconciliation reports and discrepancies and settlement batches, and each task's gateway
    breaker state (read_committed)."""
    codec = AvroCodec(SchemaRegistry())
    topics = Topics(settings.topic_prefix)
    counts: Counter[str] = Counter()
    retry_topics = {topics.retry(n): n for n in range(1, settings.retry_policy().levels + 1)}
    breakers: dict[int, str] = {}
    started = last = time.monotonic()
    tty = out.isatty()

    async def consume() -> None:
        nonlocal last
        async for r in iter_records(
            settings.bootstrap,
            topics.status,
            topics.dlq,
            topics.recon_reports,
            topics.recon_discrepancies,
            topics.settlement_batches,
            topics.breaker,
            *retry_topics,
        ):
            if r.topic in retry_topics:
                counts[f"retry L{retry_topics[r.topic]}"] += 1
            elif r.topic == topics.breaker:
                try:
                    t = codec.decode(r.value, "BreakerTransition")
                    breakers[t["task_partition"]] = t["to_state"]
                except DecodeError:
                    counts["undecodable breaker"] += 1
            elif r.topic == topics.dlq:
                counts["DLQ"] += 1
            elif r.topic == topics.settlement_batches:
                counts["settlement batches"] += 1
            elif r.topic in (topics.recon_reports, topics.recon_discrepancies):
                counts[_recon_label(codec, r.topic == topics.recon_reports, r.value)] += 1
            else:
                try:
                    status = codec.decode(r.value, "PaymentStatusChanged")
                except DecodeError:
                    counts["undecodable status"] += 1
                    continue
                counts["replay" if status["replay"] else status["status"]] += 1
                if status.get("terminal"):
                    counts[f"saga {status['saga_state']}"] += 1
            now = time.monotonic()
            if now - last >= 1.0:
                last = now
                total = sum(counts.values())
                line = f"outputs {total:>8}  " + "  ".join(
                    f"{k}={v}" for k, v in sorted(counts.items())
                )
                if breakers:
                    states = sorted(breakers.items())
                    line += "  breaker " + ",".join(f"p{p}:{s}" for p, s in states)
                print(("\r" + line) if tty else line, end="" if tty else "\n", file=out, flush=True)

    try:
        if seconds > 0:
            await asyncio.wait_for(consume(), seconds)
        else:
            await consume()
    except TimeoutError:
        pass
    print(
        f"\n{sum(counts.values())} outputs in {time.monotonic() - started:.0f}s: {dict(counts)}",
        file=out,
    )
    return 0
