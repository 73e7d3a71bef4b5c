"""Operator read-outs: the DLQ list and detail, and the live outcome counter (`watch`)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from typing import TextIO

from paysaga.schemas.codec import AvroCodec, DecodeError
from paysaga.schemas.registry import SchemaRegistry
from paysaga.streams.app.kafka_io import iter_records, read_all
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import Topics
from paysaga.streams.engine.deadletter import (
    H_KIND,
    H_OFFSET,
    H_PARTITION,
    H_REASON,
    H_TOPIC,
    parse_headers,
)


async def dlq_list(settings: Settings, limit: int = 50) -> int:
    records = await read_all(settings.bootstrap, Topics(settings.topic_prefix).dlq)
    kinds = Counter(parse_headers(r.headers).get(H_KIND, "?") for r in records)
    print(f"{len(records)} dead letters: " + ", ".join(f"{k}={n}" for k, n in kinds.items()))
    for r in records[-limit:]:
        h = parse_headers(r.headers)
        print(
            f"{r.partition}:{r.offset}  {h.get(H_KIND, '?'):<10} from "
            f"{h.get(H_TOPIC)}[{h.get(H_PARTITION)}]@{h.get(H_OFFSET)}  {h.get(H_REASON)}"
        )
    return 0


async def dlq_show(settings: Settings, ref: str) -> int:
    try:
        part, offset = (int(x) for x in ref.split(":"))
    except ValueError:
        print(f"error: expected PARTITION:OFFSET, got {ref!r}", file=sys.stderr)
        return 2
    for r in await read_all(settings.bootstrap, Topics(settings.topic_prefix).dlq):
        if (r.partition, r.offset) == (part, offset):
            for k, v in parse_headers(r.headers).items():
                print(f"{k}: {v}")
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
    """Print live counts of status outcomes, dead letters, reconciliation reports and
    discrepancies and settlement batches (read_committed)."""
    codec = AvroCodec(SchemaRegistry())
    topics = Topics(settings.topic_prefix)
    counts: Counter[str] = Counter()
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
        ):
            if r.topic == topics.dlq:
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
