"""`paysaga bench`: paysaga's intake against a plain aiokafka loop and textbook Faust, and
the whole saga with its simulators (`streams/dev/saga_bench.py`).

One invocation, one local broker, one freshly produced data set of realistic Avro
PaymentInitiated events (with retries and key conflicts). For each pipeline: throughput on
the backlog, p50/p99 latency at a fixed offered rate (input timestamp to the output being
visible to a read_committed consumer), and peak RSS of its process. Then paysaga's restore
rate from the changelog and its restart-to-ready time with N keys on local disk. Results
are ratios against the baseline measured in the same run (the machines are shared and
noisy); nothing here is asserted by tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paysaga.schemas.codec import AvroCodec
from paysaga.schemas.registry import SchemaRegistry
from paysaga.streams.app.kafka_io import iter_records
from paysaga.streams.app.net import free_port
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import Topics, changelog_topic, create_topics
from paysaga.streams.dev.broker import LocalBroker
from paysaga.streams.dev.measure import peak_rss_mib, percentile
from paysaga.streams.dev.recon_bench import recon_summary, run_recon_open
from paysaga.streams.dev.retry_bench import retries_summary, run_retries_waiting
from paysaga.streams.dev.saga_bench import SagaOptions, run_saga, saga_summary
from paysaga.streams.dev.upstream import (
    Progress,
    UpstreamConfig,
    bulk_produce,
    produce,
    upstream_producer,
)
from paysaga.streams.dev.views_bench import run_views, views_summary
from paysaga.streams.engine.partitioner import partition_for

PIPELINES = ("baseline", "faust", "paysaga")


@dataclass
class BenchOptions:
    events: int = 50_000
    rate: float = 1000.0
    latency_seconds: float = 10.0
    #: Seconds at the offered rate before the measured window (see `_latency`).
    latency_warmup_seconds: float = 3.0
    partitions: int = 3
    keys: int = 200_000
    bootstrap: str | None = None
    results_dir: Path = Path("bench/results")
    pipelines: tuple[str, ...] = PIPELINES
    #: Payments in the whole-saga backlog (0 skips the whole-saga measurement).
    saga_payments: int = 10_000
    #: Whole saga: worker processes, and partitions (None: `partitions`).
    saga_workers: int = 1
    saga_partitions: int | None = None
    #: How upstream keys the whole saga's requests (`UpstreamConfig.key`).
    saga_upstream_key: str = "payment"
    #: py-spy samples of the whole-saga worker go here (None: not profiled).
    profile: Path | None = None
    #: Captures held open in reconciliation's state, for its memory (0 skips it).
    recon_open: int = 0
    retries_waiting: int = 0
    #: Seconds of payment views asked of two workers under load (0 skips them).
    views_seconds: float = 0.0
    #: Payments/s offered while the views are asked (`make run`'s default rate).
    views_rate: float = 500.0
    #: Settings every paysaga worker of the bench runs with (intake, saga, views), by field
    #: name (`--worker-setting engine_commit_interval_ms=0`): the figures under others.
    worker_settings: dict[str, str] = field(default_factory=dict)


@dataclass
class PipelineResult:
    events_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    peak_rss_mib: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class Pipeline:
    """One pipeline process reading `source` and writing statuses to `output`."""

    def __init__(self, kind: str, bootstrap: str, prefix: str, work: Path, partitions: int,
                 worker_settings: dict[str, str] | None = None) -> None:  # fmt: skip
        self.kind = kind
        self.bootstrap = bootstrap
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.partitions = partitions
        self.settings = Settings(
            bootstrap=bootstrap, app_id=f"{prefix}{kind}".replace(".", "-"), topic_prefix=prefix,
            partitions=partitions, data_dir=work / "state", web_port=free_port(),
            topology="paysaga.streams.dev.bench_pipelines:intake_topology",
            **(worker_settings or {}),
        )  # fmt: skip
        names = Topics(prefix)
        self.source = names.initiated
        self.output = names.status if kind == "paysaga" else f"{prefix}{kind}.status"
        self.proc: subprocess.Popen | None = None

    async def prepare(self) -> None:
        await create_topics(self.settings)
        if self.kind != "paysaga":
            from aiokafka.admin import AIOKafkaAdminClient, NewTopic

            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
            await admin.start()
            try:
                group = self.settings.app_id
                await admin.create_topics([
                    NewTopic(name=self.output, num_partitions=self.partitions,
                             replication_factor=1),
                    NewTopic(name=f"{group}-changelog", num_partitions=self.partitions,
                             replication_factor=1, topic_configs={"cleanup.policy": "compact"}),
                ])  # fmt: skip
            finally:
                await admin.close()

    def start(self) -> None:
        log = open(self.work / f"{self.kind}.log", "ab")  # noqa: SIM115 - owned by the child
        env = dict(os.environ)
        if self.kind == "paysaga":
            cmd = [sys.executable, "-m", "paysaga.streams.ops.cli", "worker"]
            for name, value in self.settings.model_dump(mode="json").items():
                if value is not None:
                    env["PAYSAGA_" + name.upper()] = str(value)
        else:
            cmd = [sys.executable, "-m", "paysaga.streams.dev.bench_pipelines", self.kind,
                   self.bootstrap, self.source, self.output, self.settings.app_id,
                   str(self.work / "state"), str(self.partitions)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def rss(self) -> float:
        return peak_rss_mib(self.proc.pid) if self.proc else 0.0

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def _observe(
    bootstrap: str,
    topic: str,
    expected: int,
    codec: AvroCodec,
    timeout: float,
    bar: Progress | None = None,
) -> tuple[float, list[tuple[int, float]], int]:
    """Follow `topic` (read_committed) until `expected` records.

    Returns (seconds from the first output to the last, samples, n); a sample is the
    input's event time (ms) and how long after it its output became visible (ms).
    """
    first = last = 0.0
    samples: list[tuple[int, float]] = []
    n = 0
    try:
        async for r in iter_records(bootstrap, topic, follow=True, timeout=timeout):
            now = time.time()
            if n == 0:
                first = now
            last = now
            n += 1
            occurred = codec.decode(r.value, "PaymentStatusChanged")["occurred_at"]
            samples.append((occurred, now * 1000 - occurred))
            if bar is not None:
                bar.update(n)
            if n >= expected:
                break
    except TimeoutError:
        print(f"\nwarning: {topic}: {n} of {expected} outputs within {timeout:.0f}s",
              file=sys.stderr)  # fmt: skip
    return last - first, samples, n


async def _throughput(p: Pipeline, opts: BenchOptions, codec: AvroCodec) -> PipelineResult:
    bar = Progress(opts.events, f"{p.kind:>8} throughput")
    p.start()
    try:
        seconds, _, n = await _observe(p.bootstrap, p.output, opts.events, codec, 900, bar)
        bar.close(n)
        rss = p.rss()
    finally:
        p.stop()
    return PipelineResult(events_per_s=(n - 1) / seconds if seconds > 0 else 0.0,
                          peak_rss_mib=rss, extra={"outputs": n})  # fmt: skip


async def _latency(p: Pipeline, opts: BenchOptions, codec: AvroCodec) -> tuple[float, float]:
    """p50/p99 ms at `opts.rate` offered, in steady state.

    The first seconds at a new rate measure warm-up, not the pipeline: the broker's JIT
    compiles its transaction paths only after hundreds of transactions, and the worker's
    first batches at the new rate build a queue that then drains (measured: p99 of the
    first second 2-3x that of the next nine). So the paced load runs for
    `latency_warmup_seconds` first, without a pause, and only inputs sent after that count.
    """
    per_s, warmup = opts.rate, opts.latency_warmup_seconds
    count = int(per_s * (warmup + opts.latency_seconds))
    producer = upstream_producer(p.bootstrap)
    await producer.start()
    p.start()
    try:
        # First transactions, metadata, the upstream producer's id and connections, on
        # every partition; then the paced load through the same producer.
        first_n = 50 * opts.partitions
        first = UpstreamConfig(count=first_n, seed=991, duplicate_rate=0, conflict_rate=0)
        await produce(p.bootstrap, codec, first, topic=p.source, progress=False,
                      producer=producer)  # fmt: skip
        await _observe(p.bootstrap, p.output, first_n, codec, 120)
        cfg = UpstreamConfig(count=count, seed=992)
        measured_from = (time.time() + warmup) * 1000
        paced = produce(p.bootstrap, codec, cfg, rate=per_s, topic=p.source,
                        progress=False, producer=producer)  # fmt: skip
        sender = asyncio.create_task(paced)
        bar = Progress(count + first_n, f"{p.kind:>8} latency @{per_s:.0f}/s")
        timeout = (warmup + opts.latency_seconds) * 6 + 60
        _, samples, n = await _observe(p.bootstrap, p.output, count + first_n, codec,
                                       timeout, bar)  # fmt: skip
        bar.close(n)
        await sender
    finally:
        p.stop()
        await producer.stop()
    steady = [latency for occurred, latency in samples if occurred >= measured_from]
    return percentile(steady, 0.50), percentile(steady, 0.99)


async def _restore(opts: BenchOptions, bootstrap: str, run: str, work: Path) -> dict[str, float]:
    """Restore rate from the changelog, and restart-to-ready with `opts.keys` on disk."""
    p = Pipeline("paysaga", bootstrap, f"{run}-restore.", work / "restore", opts.partitions)
    await create_topics(p.settings)
    topic = changelog_topic(p.settings, "payments")

    def records() -> Iterator[tuple[bytes, bytes, int]]:
        for i in range(opts.keys):
            key = f"pay_restore_{i:010d}".encode()
            record = {"payment_id": key.decode(), "amount_minor": 1000 + i, "currency": "EUR",
                      "status": "INITIATED", "version": 1, "merchant_id": f"m_{i % 50:03d}",
                      "history": []}  # fmt: skip
            yield key, json.dumps(record).encode(), partition_for(key, opts.partitions)

    await bulk_produce(bootstrap, topic, records(), opts.keys, "  changelog keys")

    async def ready(timeout: float) -> tuple[float, dict]:
        import urllib.request

        began = time.monotonic()
        url = f"http://127.0.0.1:{p.settings.web_port}/ready/"
        while time.monotonic() - began < timeout:
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    return time.monotonic() - began, json.loads(resp.read())
            except OSError:
                await asyncio.sleep(0.05)  # polling readiness, with a deadline
        raise TimeoutError("worker not ready")

    p.start()
    try:
        cold, body = await ready(900)
        rss = p.rss()
    finally:
        p.stop()
    p.start()
    try:
        warm, _ = await ready(300)
    finally:
        p.stop()
    stats = body["stats"]
    return {
        "keys": opts.keys,
        "restored_records": stats["restored"],
        "restore_records_per_s": stats["restored"] / max(stats["restore_seconds"], 1e-9),
        "cold_start_to_ready_s": cold,
        "restart_to_ready_s": warm,
        "peak_rss_mib_during_restore": rss,
    }


async def _pipelines(
    opts: BenchOptions, bootstrap: str, run: str, work: Path, codec: AvroCodec, results: dict
) -> None:
    """Throughput, latency and RSS of each pipeline on one shared data set."""
    # One data set, produced once, read by every pipeline from its own consumer group.
    shared = Pipeline("paysaga", bootstrap, f"{run}.", work, opts.partitions)
    await shared.prepare()
    cfg = UpstreamConfig(count=opts.events, seed=2026)
    await produce(bootstrap, codec, cfg, topic=shared.source)
    for kind in opts.pipelines:
        p = Pipeline(kind, bootstrap, f"{run}.", work / kind, opts.partitions,
                     opts.worker_settings)  # fmt: skip
        await p.prepare()
        res = await _throughput(p, opts, codec)
        lat = Pipeline(kind, bootstrap, f"{run}-lat-{kind}.", work / f"lat-{kind}",
                       opts.partitions, opts.worker_settings)  # fmt: skip
        await lat.prepare()
        res.p50_ms, res.p99_ms = await _latency(lat, opts, codec)
        results["pipelines"][kind] = res.__dict__


async def run_bench(opts: BenchOptions) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="paysaga-bench-"))
    broker = None
    bootstrap = opts.bootstrap
    if bootstrap is None:
        broker = LocalBroker(work / "broker", free_port())
        took = await asyncio.to_thread(broker.up)
        print(f"local broker up in {took:.1f}s at {broker.bootstrap}")
        bootstrap = broker.bootstrap
    codec = AvroCodec(SchemaRegistry())
    run = f"bench{int(time.time())}"
    results: dict[str, Any] = {
        "run": run, "events": opts.events, "partitions": opts.partitions, "rate": opts.rate,
        "latency_seconds": opts.latency_seconds,
        "latency_warmup_seconds": opts.latency_warmup_seconds,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "pipelines": {},
        "worker_settings": opts.worker_settings,
    }  # fmt: skip
    ok = False
    try:
        if opts.events > 0:
            await _pipelines(opts, bootstrap, run, work, codec, results)
        if "paysaga" in opts.pipelines and opts.keys > 0:
            results["restore"] = await _restore(opts, bootstrap, run, work)
        if opts.saga_payments > 0:
            saga = SagaOptions(payments=opts.saga_payments, rate=opts.rate,
                               latency_seconds=opts.latency_seconds,
                               warmup_seconds=opts.latency_warmup_seconds,
                               partitions=opts.saga_partitions or opts.partitions,
                               workers=opts.saga_workers, profile=opts.profile,
                               upstream_key=opts.saga_upstream_key,
                               worker_settings=opts.worker_settings)  # fmt: skip
            pid = broker.pid() if broker is not None else None
            results["saga"] = await run_saga(saga, bootstrap, run, work, codec, pid)
        if opts.retries_waiting > 0:
            n = opts.retries_waiting
            results["retries"] = await run_retries_waiting(n, bootstrap, run, work,
                                                           opts.partitions, codec)  # fmt: skip
        if opts.views_seconds > 0:
            pid = broker.pid() if broker is not None else None
            results["views"] = await run_views(opts.views_seconds, bootstrap, run, work,
                                               opts.partitions, codec, opts.views_rate,
                                               worker_settings=opts.worker_settings,
                                               profile=opts.profile,
                                               broker_pid=pid)  # fmt: skip
        if opts.recon_open > 0:
            results["recon"] = await run_recon_open(opts.recon_open, bootstrap, run, work,
                                                    opts.partitions, codec)  # fmt: skip
        ok = True
    finally:
        if broker is not None:
            await asyncio.to_thread(broker.down)
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"bench failed; logs kept in {work}", file=sys.stderr)
    base = results["pipelines"].get("baseline", {}).get("events_per_s")
    for res in results["pipelines"].values():
        res["ratio_to_baseline"] = res["events_per_s"] / base if base else None
    opts.results_dir.mkdir(parents=True, exist_ok=True)
    path = opts.results_dir / f"{run}.json"
    path.write_text(json.dumps(results, indent=2))
    print(summary(results))
    print(f"results: {path}")
    return results


def summary(results: dict[str, Any]) -> str:
    head = f"\npaysaga bench {results['run']}: {results['partitions']} partitions"
    if results["pipelines"]:
        head += (
            f", {results['events']} events, latency at {results['rate']:.0f}/s offered "
            f"(after {results.get('latency_warmup_seconds', 0):.0f} s at that rate)"
        )
    if results.get("worker_settings"):
        head += "; workers with " + ", ".join(
            f"{k}={v}" for k, v in results["worker_settings"].items()
        )
    lines = [head]
    if results["pipelines"]:
        lines.append(
            f"{'pipeline':<10}{'events/s':>10}{'x baseline':>12}{'p50 ms':>9}{'p99 ms':>9}"
            f"{'peak RSS MiB':>14}"
        )
    for kind, r in results["pipelines"].items():
        ratio = r.get("ratio_to_baseline")
        lines.append(
            f"{kind:<10}{r['events_per_s']:>10,.0f}{(ratio or 0):>12.2f}{r['p50_ms']:>9.1f}"
            f"{r['p99_ms']:>9.1f}{r['peak_rss_mib']:>14.0f}"
        )
    if "saga" in results:
        lines.append(saga_summary(results["saga"]))
    if "recon" in results:
        lines.append(recon_summary(results["recon"]))
    if "retries" in results:
        lines.append(retries_summary(results["retries"]))
    if "views" in results:
        lines.append(views_summary(results["views"]))
    if "restore" in results:
        r = results["restore"]
        lines.append(
            f"restore: {r['restored_records']:,} changelog records at "
            f"{r['restore_records_per_s']:,.0f}/s; cold start to ready "
            f"{r['cold_start_to_ready_s']:.1f}s; restart to ready with {r['keys']:,} keys "
            f"{r['restart_to_ready_s']:.1f}s; peak RSS {r['peak_rss_mib_during_restore']:.0f} MiB"
        )
    return "\n".join(lines)
