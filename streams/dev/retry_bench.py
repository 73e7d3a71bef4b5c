"""Scheduled retries' state under `paysaga bench --retries-waiting N`: N payments waiting.

N payments (the upstream producer's mix, PAYMENT sagas) go through the full payment topology
in one worker; once each AUTHORIZE is out, the gateway's answer to every one is a transient
failure (written here, with the command ids the saga derives), so every payment schedules a
retry. The retry levels are an hour long, so all N wait at once. Measured once every
`RetryScheduled` record is committed: the worker's peak RSS (VmHWM) and the state on disk.
The claim it checks (docs/retries.md#how-a-retry-waits): a waiting retry is a row of the
payments table and a timer entry in RocksDB, not a Python object, so memory does not grow
with the retries waiting. Figures are reported, never asserted.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from paysaga.domain.saga import command_id
from paysaga.schemas.codec import AvroCodec
from paysaga.streams.app.kafka_io import iter_records
from paysaga.streams.app.net import free_port
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import Topics, create_topics
from paysaga.streams.dev.measure import peak_rss_mib
from paysaga.streams.dev.upstream import Progress, UpstreamConfig, bulk_produce, generate
from paysaga.streams.engine.partitioner import partition_for

HOUR_MS = 3_600_000


def _requests(n: int) -> Iterator[dict[str, Any]]:
    cfg = UpstreamConfig(count=n, seed=17, duplicate_rate=0.0, conflict_rate=0.0,
                         manual_capture_rate=0.0, order_rate=0.0)  # fmt: skip
    return generate(cfg)


def _failure(event: dict[str, Any], i: int) -> dict[str, Any]:
    pid = event["payment_id"]
    return {
        "event_id": f"00000000-0000-5000-9000-{i:012d}", "occurred_at": event["occurred_at"] + 5,
        "payment_id": pid, "correlation_id": event["correlation_id"], "causation_id": None,
        "reason_code": "gateway_unavailable", "reason": "503", "step": "authorize",
        "retryable": True, "command_id": command_id(f"{pid}:authorize:action", 1),
    }  # fmt: skip


async def _count(bootstrap: str, topic: str, n: int, label: str, proc: Any) -> None:
    """Follow `topic` (read_committed) until it holds `n` records, with a deadline."""
    bar, seen = Progress(n, label), 0
    async for _ in iter_records(bootstrap, topic, follow=True, timeout=3600):
        seen += 1
        if seen % 1000 == 0:
            bar.update(seen)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the worker exited ({proc.returncode})")
        if seen >= n:
            break
    bar.close(seen)


async def run_retries_waiting(n: int, bootstrap: str, run: str, work: Path, partitions: int,
                              codec: AvroCodec) -> dict[str, Any]:  # fmt: skip
    from paysaga.streams.dev.bench import Pipeline

    prefix = f"{run}-retry."
    p = Pipeline("paysaga", bootstrap, prefix, work / "retries-waiting", partitions)
    p.settings = p.settings.model_copy(update={
        "topology": Settings.model_fields["topology"].default, "web_port": free_port(),
        "retry_variants": "WAIT:1:" + ",".join([str(HOUR_MS)] * 4),
        "command_timeout_ms": HOUR_MS,
    })  # fmt: skip
    await create_topics(p.settings, log=None)
    t = Topics(prefix)

    def initiated() -> Iterator[tuple[bytes, bytes, int]]:
        for e in _requests(n):
            key = e["payment_id"].encode()
            yield key, codec.encode("PaymentInitiated", e), partition_for(key, partitions)

    def failures() -> Iterator[tuple[bytes, bytes, int]]:
        for i, e in enumerate(_requests(n)):
            key = e["payment_id"].encode()
            yield key, codec.encode("PaymentFailed", _failure(e, i)), partition_for(key, partitions)

    await bulk_produce(bootstrap, t.initiated, initiated(), n, "  payments")
    p.start()
    began = time.monotonic()
    try:
        await _count(bootstrap, t.commands, n, "  authorizations out", p.proc)
        await bulk_produce(bootstrap, t.failed, failures(), n, "  gateway 503s")
        await _count(bootstrap, t.retry(1), n, "  retries scheduled", p.proc)
        elapsed = time.monotonic() - began
        rss = peak_rss_mib(p.proc.pid) if p.proc else 0.0
    finally:
        p.stop()
    state = sum(f.stat().st_size for f in p.settings.data_dir.rglob("*") if f.is_file())
    return {"retries": n, "seconds": elapsed, "peak_rss_mib": rss, "state_mib": state / 2**20}


def retries_summary(r: dict[str, Any]) -> str:
    return (
        f"scheduled retries: {r['retries']:,} waiting at once after {r['seconds']:.0f} s; "
        f"worker peak RSS {r['peak_rss_mib']:.0f} MiB; state on disk {r['state_mib']:.0f} MiB"
    )
