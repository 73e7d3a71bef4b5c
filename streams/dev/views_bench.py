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
from paysaga.streams.dev.measure import percentile
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
                    slice_ms: float | None = None) -> dict[str, Any]:  # fmt: skip
    """`slice_ms`: the workers' `engine_slice_ms` (None: the default)."""
    extra = {} if slice_ms is None else {"engine_slice_ms": slice_ms}
    rig = SagaRig(bootstrap, f"{run}-views.", work / "views", partitions, workers=2, **extra)
    await rig.prepare()
    rig.start()
    try:
        await rig.ready()
        cfg = UpstreamConfig(count=int(rate * seconds), seed=2031, manual_capture_rate=0.0)
        ids = [e["payment_id"] for e in generate(cfg)]
        names = Topics(rig.settings.topic_prefix)
        started = time.monotonic()
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            client = asyncio.get_running_loop().run_in_executor(
                pool, _ask, rig.ports, ids, rate, queries_per_s, started, seconds)  # fmt: skip
            await produce(bootstrap, codec, cfg, rate=rate, topic=names.initiated, progress=False)
            samples, codes = await client
        lags = [await asyncio.to_thread(loop_lag, port) for port in rig.ports]
    finally:
        rig.stop()
    return {
        "rate": rate,
        "seconds": seconds,
        "slice_ms": rig.settings.engine_slice_ms,
        "codes": dict(codes),
        **{hop: _figures(s) for hop, s in samples.items()},
        "loop_lag": lags,
    }


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
            f"({r['seconds']:.0f} s, engine slices of {r.get('slice_ms', '?')} ms; answers "
            f"{dict(sorted(r['codes'].items()))}):"]  # fmt: skip
    for hop in ("owner", "forwarded"):
        f = r[hop]
        rows.append(f"  {hop:<10} p50 {f['p50_ms']:.1f} ms, p95 {f['p95_ms']:.1f} ms, "
                    f"p99 {f['p99_ms']:.1f} ms ({f['samples']} answers)")  # fmt: skip
    for i, lag in enumerate(r.get("loop_lag", []), 1):
        rows.append(f"  worker {i} event loop: {lag['ticks']:.0f} ticks of 50 ms, late by over "
                    f"5 ms {lag['over_5ms']:.1%}, 10 ms {lag['over_10ms']:.1%}, 25 ms "
                    f"{lag['over_25ms']:.1%}; of the lag, {lag.get('busy_share', 0):.0%} running "
                    "code, the rest waiting for a core")  # fmt: skip
    return "\n".join(rows)
