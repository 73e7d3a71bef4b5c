"""`paysaga bench --views-seconds N`: how fast a payment view answers under load, asked of
its owner and asked of the other worker (one forwarded hop).

Two workers share the tasks of one application; the three simulators answer; upstream
sends payments at the offered rate (the `make run` load by default, 500/s) while a client
asks both workers for payments already sent, at a fixed rate. Each answer says whether it
was forwarded (`X-Paysaga-Forwarded-By`), so the samples split into "owner" and
"forwarded"; a 404 (asked before the saga stored it) or a 503 (never expected here: no
rebalance) is counted, not timed.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
import urllib.request
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from paysaga.schemas.codec import AvroCodec
from paysaga.streams.app.topics import Topics
from paysaga.streams.dev.measure import cpu_seconds, percentile
from paysaga.streams.dev.profile import attach, detach, report
from paysaga.streams.dev.saga_bench import SagaRig
from paysaga.streams.dev.upstream import UpstreamConfig, generate, produce
from paysaga.streams.ops.metrics import LoopWatch
from paysaga.streams.ops.routing import H_FORWARDED_BY


def _figures(samples: list[float]) -> dict[str, float]:
    return {"p50_ms": percentile(samples, 0.50), "p95_ms": percentile(samples, 0.95),
            "p99_ms": percentile(samples, 0.99), "samples": len(samples)}  # fmt: skip


def _ask(
    ports: list[int],
    ids: list[str],
    rate: float,
    queries_per_s: float,
    started: float,
    seconds: float,
) -> tuple[dict[str, list[float]], Counter[int]]:
    """The client, in a process of its own: what it measures is the workers' answer, not
    its own turn (the bench's producer would share its loop, or its interpreter lock on a
    thread). It asks from `started` (the system's monotonic clock) for `seconds`."""
    samples: dict[str, list[float]] = {"owner": [], "forwarded": []}
    codes: Counter[int] = Counter()

    async def go() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            n = 0
            while time.monotonic() - started < seconds:
                sent = int((time.monotonic() - started) * rate)  # about how many went out
                if sent > 50:
                    pid = ids[(n * 7919) % max(1, sent - 50)]  # one sent a while ago
                    t0 = time.perf_counter()
                    async with http.get(f"http://127.0.0.1:{ports[n % 2]}/payments/{pid}/") as r:
                        await r.read()
                        ms = (time.perf_counter() - t0) * 1000
                        codes[r.status] += 1
                        if r.status == 200:
                            hop = "forwarded" if H_FORWARDED_BY in r.headers else "owner"
                            samples[hop].append(ms)
                n += 1
                await asyncio.sleep(1 / queries_per_s)  # the client's pace, not a wait

    asyncio.run(go())
    return samples, codes


async def run_views(seconds: float, bootstrap: str, run: str, work: Path, partitions: int,
                    codec: AvroCodec, rate: float = 500.0, queries_per_s: float = 200.0,
                    worker_settings: dict[str, str] | None = None,
                    profile: Path | None = None,
                    broker_pid: int | None = None) -> dict[str, Any]:  # fmt: skip
    """`worker_settings`: what the two workers run with, by settings field (None: the
    defaults); `profile`: where py-spy's samples of the first worker go while the views
    are asked (None: none); `broker_pid`: the broker's, for its share of the cores."""
    rig = SagaRig(bootstrap, f"{run}-views.", work / "views", partitions, workers=2,
                  **(worker_settings or {}))  # fmt: skip
    await rig.prepare()
    rig.start()
    profiler = None
    try:
        await rig.ready()
        cfg = UpstreamConfig(count=int(rate * seconds), seed=2031, manual_capture_rate=0.0)
        ids = [e["payment_id"] for e in generate(cfg)]
        names = Topics(rig.settings.topic_prefix)
        stats0, cpu0 = rig.stats(), self_and(rig.cpu(broker_pid))
        if profile is not None:
            profiler = attach(rig.workers[0].pid, profile / "views.raw")
        started = time.monotonic()
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            client = asyncio.get_running_loop().run_in_executor(
                pool, _ask, rig.ports, ids, rate, queries_per_s, started, seconds)  # fmt: skip
            await produce(bootstrap, codec, cfg, rate=rate, topic=names.initiated, progress=False)
            samples, codes = await client
        took = time.monotonic() - started
        stats1, cpu1 = rig.stats(), self_and(rig.cpu(broker_pid))
        lags = [await asyncio.to_thread(loop_lag, port) for port in rig.ports]
    finally:
        if profiler is not None:
            detach(profiler)
        rig.stop()
    return {
        "rate": rate,
        "seconds": seconds,
        "slice_ms": rig.settings.engine_slice_ms,
        "commit_interval_ms": rig.settings.engine_commit_interval_ms,
        "codes": dict(codes),
        **{hop: _figures(s) for hop, s in samples.items()},
        "loop_lag": lags,
        "cpu_share": {k: (cpu1[k] - cpu0[k]) / took for k in cpu1},
        "batches": stats1.get("batches", 0) - stats0.get("batches", 0),
        "records": stats1.get("records", 0) - stats0.get("records", 0),
        **({} if profile is None else {"profile": report(profile / "views.raw")}),
    }


def self_and(cpu: dict[str, float]) -> dict[str, float]:
    """`SagaRig.cpu`'s figures and this process's own (upstream's producer)."""
    return {**cpu, "upstream": cpu_seconds(os.getpid())}


def loop_lag(port: int) -> dict[str, float]:
    """A worker's event-loop lag since its start (`paysaga_event_loop_lag_seconds`): the
    share of its 50 ms ticks that ran over 5, 10 and 25 ms late. A view waits as long for
    a turn, so this tells a busy loop from a slow answer."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    buckets, late = {}, {"busy": 0.0, "waiting": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name == LoopWatch.NAME:
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    buckets[s.labels["le"]] = s.value
        if family.name == LoopWatch.LATE:
            late.update({s.labels["cause"]: s.value for s in family.samples
                         if s.name.endswith("_total")})  # fmt: skip
    total = buckets.get("+Inf", 0.0)
    shares = {f"over_{ms}ms": (total - buckets.get(le, total)) / total if total else 0.0
              for ms, le in ((5, "0.005"), (10, "0.01"), (25, "0.025"))}  # fmt: skip
    lagged = late["busy"] + late["waiting"]
    return {"ticks": total, **shares, "busy_share": late["busy"] / lagged if lagged else 0.0}


def views_summary(r: dict[str, Any]) -> str:
    rows = [f"payment views while {r['rate']:.0f} payments/s flow through two workers "
            f"({r['seconds']:.0f} s, engine slices of {r.get('slice_ms', '?')} ms, commit interval "
            f"{r.get('commit_interval_ms', 0):.0f} ms; answers "
            f"{dict(sorted(r['codes'].items()))}):"]  # fmt: skip
    for hop in ("owner", "forwarded"):
        f = r[hop]
        rows.append(f"  {hop:<10} p50 {f['p50_ms']:.1f} ms, p95 {f['p95_ms']:.1f} ms, "
                    f"p99 {f['p99_ms']:.1f} ms ({f['samples']} answers)")  # fmt: skip
    if "cpu_share" in r:
        batches = r["batches"]
        rows.append(
            f"  {batches} transactions, {r['records'] / max(1, batches):.1f} records "
            "each; cores used: " + ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_share"].items())
        )
    for i, lag in enumerate(r.get("loop_lag", []), 1):
        rows.append(f"  worker {i} event loop: {lag['ticks']:.0f} ticks of 50 ms, late by over "
                    f"5 ms {lag['over_5ms']:.1%}, 10 ms {lag['over_10ms']:.1%}, 25 ms "
                    f"{lag['over_25ms']:.1%}; of the lag, {lag.get('busy_share', 0):.0%} running "
                    "code, the rest waiting for a core")  # fmt: skip
    if "profile" in r:
        rep = r["profile"]
        rows.append(
            f"  worker 1 CPU by stage ({rep['samples']} samples): "
            + ", ".join(f"{stage} {share:.0%}" for stage, share in rep["stages"].items())
        )
    return "\n".join(rows)
