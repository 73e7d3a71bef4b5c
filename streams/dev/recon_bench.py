"""Reconciliation's state under `paysaga bench --recon-open N`: N captures held open.

N `PaymentCaptured` records (keyed by payment, 1,000 merchants, one currency) are written
first, then a worker running reconciliation alone (`recon_topology`) reads them, with
windows that cannot close during the run: every capture stays an open entry of the `recon`
table. Measured once the worker has committed every input (its own `stats.records`, the
captures and their re-keyed copies): captures/s, the worker's peak RSS (VmHWM) and the
recon table's size on disk. The claim it checks: window state lives in RocksDB, not in
Python objects, so memory does not grow with the open captures
(docs/reconciliation.md#state). Figures are reported, never asserted.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from paysaga.agents.reconciliation import ReconAgent
from paysaga.schemas.codec import AvroCodec
from paysaga.schemas.registry import SchemaRegistry
from paysaga.streams.app.net import free_port
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import Topics, create_topics
from paysaga.streams.app.topology import recon_policy
from paysaga.streams.dev.measure import peak_rss_mib
from paysaga.streams.dev.upstream import Progress, bulk_produce
from paysaga.streams.engine import Topology
from paysaga.streams.engine.partitioner import partition_for

MERCHANTS = 1_000
DAY_MS = 24 * 3_600_000


def recon_topology(settings: Settings) -> Topology:
    """Reconciliation alone, as the payment topology declares it."""
    codec = AvroCodec(SchemaRegistry())
    topology = Topology(serializer=codec.encode)
    ReconAgent(codec, Topics(settings.topic_prefix), settings.partitions,
               recon_policy(settings)).add_to(topology)  # fmt: skip
    return topology


def _capture(i: int, at: int) -> tuple[bytes, str, dict[str, Any]]:
    pid = f"pay_open_{i:010d}"
    merchant = f"m_open_{i % MERCHANTS:04d}"
    return pid.encode(), merchant, {
        "event_id": f"00000000-0000-5000-8000-{i:012d}", "occurred_at": at + i % 1000,
        "payment_id": pid, "correlation_id": f"ord_open_{i:010d}", "causation_id": None,
        "amount_minor": 100 + i % 99_900, "currency": "EUR", "merchant_id": merchant,
        "gateway_reference": f"ch_open_{i:010d}", "capture_id": f"cap_open_{i:010d}",
        "command_id": None,
    }  # fmt: skip


async def _produce(bootstrap: str, topic: str, n: int, partitions: int, codec: AvroCodec,
                   at: int) -> int:  # fmt: skip
    """Write the captures; returns how many inputs the worker will commit (each capture,
    and its re-keyed copy when its merchant lives on another partition)."""
    inputs = 0

    def records() -> Iterator[tuple[bytes, bytes, int]]:
        nonlocal inputs
        for i in range(n):
            key, merchant, rec = _capture(i, at)
            part = partition_for(key, partitions)
            inputs += 1 + (partition_for(merchant.encode(), partitions) != part)
            yield key, codec.encode("PaymentCaptured", rec), part

    await bulk_produce(bootstrap, topic, records(), n, "  open captures")
    return inputs


def _stats(port: int) -> dict[str, Any] | None:
    """The worker's /ready/ body; its counters come with a 503 too (a rebalance)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready/", timeout=5) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        raw = exc.read()
    except OSError:
        return None
    try:
        body: dict[str, Any] = json.loads(raw)
    except ValueError:
        return None
    return body if "stats" in body else None


def _du_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


async def run_recon_open(n: int, bootstrap: str, run: str, work: Path, partitions: int,
                         codec: AvroCodec) -> dict[str, Any]:  # fmt: skip
    from paysaga.streams.dev.bench import Pipeline

    prefix = f"{run}-recon."
    p = Pipeline("paysaga", bootstrap, prefix, work / "recon-open", partitions)
    # Windows of a day closing a day after: nothing closes while the run lasts.
    p.settings = p.settings.model_copy(update={
        "topology": "paysaga.streams.dev.recon_bench:recon_topology",
        "recon_window_ms": DAY_MS, "recon_grace_ms": DAY_MS, "web_port": free_port(),
    })  # fmt: skip
    await create_topics(p.settings, log=None)
    now = int(time.time() * 1000)
    expected = await _produce(bootstrap, Topics(prefix).captured, n, partitions, codec, now)
    bar = Progress(expected, "  reconciliation inputs")
    p.start()
    began = time.monotonic()
    done = 0
    try:
        while True:
            body = _stats(p.settings.web_port)  # None while busy or not ready: keep the last
            if body is not None:
                done = int(body["stats"].get("records", 0))
                bar.update(done)
            if done >= expected:
                break
            if p.proc is not None and p.proc.poll() is not None:
                raise RuntimeError(f"the reconciliation worker exited ({p.proc.returncode})")
            if time.monotonic() - began > 3600:
                raise TimeoutError(f"reconciliation committed {done} of {expected} inputs")
            await asyncio.sleep(0.5)  # polling the worker's committed count, with a deadline
        elapsed = time.monotonic() - began
        bar.close(expected)
        rss = peak_rss_mib(p.proc.pid) if p.proc else 0.0
    finally:
        p.stop()
    return {
        "captures": n, "merchants": min(n, MERCHANTS), "seconds": elapsed,
        "captures_per_s": n / elapsed if elapsed else 0.0, "peak_rss_mib": rss,
        "state_mib": _du_mib(p.settings.data_dir),
    }  # fmt: skip


def recon_summary(r: dict[str, Any]) -> str:
    return (
        f"reconciliation state: {r['captures']:,} open captures of {r['merchants']:,} "
        f"merchants in {r['seconds']:.0f} s ({r['captures_per_s']:,.0f}/s); worker peak RSS "
        f"{r['peak_rss_mib']:.0f} MiB; state on disk {r['state_mib']:.0f} MiB"
    )
