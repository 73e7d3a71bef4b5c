"""The whole saga under `paysaga bench`: the payment topology with its three simulators.

One worker (the real payment topology) and the card gateway, inventory and shipping
simulators run as processes of their own beside the benchmark's broker. Two phases:

- backlog: a data set of the upstream producer's mix (client retries, key conflicts, order
  sagas; automatic capture only, so every payment can end without an operator) is written
  first, then the worker and simulators start. Measured: payments/s from the first status
  record to the last terminal status, and to 90 % of them (the simulator drops 3 % of the
  gateway's answers, and their command timeouts decide the tail, not the worker), and the
  CPU seconds of the worker, each simulator and the broker over the backlog, apart, with
  the worker's CPU per payment;
- replay: the backlog's history replayed from its journal (docs/replay.md) into an
  isolated application and verified against the live payments table; its records/s
  against the live worker's over the backlog (the live rate waits on the simulators'
  round trips, the replay reads their recorded answers, so it should run ahead);
- latency: a fresh deployment at a fixed offered rate; per payment, from its
  PaymentInitiated's event time to its AUTHORIZED status being visible to a read_committed
  consumer, after a warm-up at that rate (as the intake comparison measures).

Figures are reported, never asserted (docs/exactly-once.md#how-it-is-measured).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paysaga.schemas.codec import AvroCodec
from paysaga.streams.app.kafka_io import iter_records
from paysaga.streams.app.net import free_port
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import Topics, create_topics
from paysaga.streams.dev.demo import _spawn, _stop
from paysaga.streams.dev.measure import cpu_seconds, peak_rss_mib, percentile
from paysaga.streams.dev.profile import attach, detach, report, stage_table
from paysaga.streams.dev.upstream import Progress, UpstreamConfig, generate, produce

SERVICES = ("gateway", "inventory", "shipping")


@dataclass
class SagaOptions:
    payments: int = 10_000
    rate: float = 1000.0
    latency_seconds: float = 10.0
    warmup_seconds: float = 3.0
    partitions: int = 3
    #: Worker processes (the scaling check runs 2 on 6 partitions).
    workers: int = 1
    #: How upstream keys its requests (`UpstreamConfig.key`; "scope": no repartition hop).
    upstream_key: str = "payment"
    #: Where py-spy's samples of the worker over the backlog go (None: not profiled).
    profile: Path | None = None
    #: Settings every worker runs with (`paysaga bench --worker-setting`), by field name.
    worker_settings: dict[str, str] = field(default_factory=dict)


class SagaRig:
    """Workers running the payment topology (one by default) and the three simulators, as
    processes. Several workers share the application id, so the group splits the tasks."""

    def __init__(self, bootstrap: str, prefix: str, work: Path, partitions: int,
                 workers: int = 1, **overrides: Any) -> None:  # fmt: skip
        work.mkdir(parents=True, exist_ok=True)
        self.work = work
        self.settings = Settings(
            bootstrap=bootstrap, app_id=prefix.rstrip(".").replace(".", "-"),
            topic_prefix=prefix, partitions=partitions, data_dir=work / "state",
            web_port=free_port(),
            # Batches that submit within the run: each payment's SETTLE goes out, as live.
            settlement_batch_ms=2_000, settlement_cutoff_ms=500, **overrides,
        )  # fmt: skip
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PAYSAGA_")}
        for name, value in self.settings.model_dump(mode="json").items():
            if value is not None:
                self.env["PAYSAGA_" + name.upper()] = str(value)
        #: Web port of each worker (the first is the settings' own).
        self.ports = [self.settings.web_port, *(free_port() for _ in range(workers - 1))]
        self.workers: list[subprocess.Popen[bytes]] = []
        self.simulators: dict[str, subprocess.Popen[bytes]] = {}

    async def prepare(self) -> None:
        await create_topics(self.settings, log=None)

    def start(self) -> None:
        for i, port in enumerate(self.ports):
            env = {**self.env, "PAYSAGA_WEB_PORT": str(port),
                   "PAYSAGA_DATA_DIR": str(self.work / f"state-{i}")}  # fmt: skip
            self.workers.append(_spawn(["worker"], env, self.work / f"worker-{i}.log"))
        for service in SERVICES:
            self.simulators[service] = _spawn(["simulate", service], self.env,
                                              self.work / f"sim-{service}.log")  # fmt: skip

    async def ready(self, timeout: float = 120) -> None:
        """Until every worker answers ready (owns its tasks, restored)."""
        deadline = time.monotonic() + timeout
        for port in self.ports:
            url = f"http://127.0.0.1:{port}/ready/"
            while True:
                try:
                    with urllib.request.urlopen(url, timeout=1):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"saga worker not ready; see {self.work}") from None
                    await asyncio.sleep(0.1)  # polling readiness, with a deadline

    def stats(self) -> dict[str, Any]:
        """The engine's counters of all workers, from their readiness views."""
        total: dict[str, Any] = {}
        for port in self.ports:
            try:
                url = f"http://127.0.0.1:{port}/ready/"
                with urllib.request.urlopen(url, timeout=5) as resp:
                    stats = json.load(resp).get("stats", {})
            except OSError:
                continue
            for k, v in stats.items():
                if isinstance(v, int | float):
                    total[k] = total.get(k, 0) + v
        return total

    def cpu(self, broker_pid: int | None) -> dict[str, float]:
        out = {"worker": sum(cpu_seconds(w.pid) for w in self.workers)}
        out.update({s: cpu_seconds(p.pid) for s, p in self.simulators.items()})
        out["broker"] = cpu_seconds(broker_pid)
        return out

    def peak_rss_mib(self) -> float:
        """The largest worker's peak RSS."""
        return max((peak_rss_mib(w.pid) for w in self.workers), default=0.0)

    def stop(self) -> None:
        for proc in [*self.simulators.values(), *self.workers]:
            _stop(proc)


def _payments(cfg: UpstreamConfig) -> set[str]:
    """Every payment id of the data set. Each ends with a terminal status, or is refused
    with IDEMPOTENCY_CONFLICT: a conflicting request with another payment id reaches the
    key's partition first or second depending on its own partition's progress."""
    return {e["payment_id"] for e in generate(cfg)}


def _ended(status: dict[str, Any]) -> bool:
    return bool(status["terminal"]) or status["status"] == "IDEMPOTENCY_CONFLICT"


async def backlog(opts: SagaOptions, bootstrap: str, run: str, work: Path, codec: AvroCodec,
                  broker_pid: int | None) -> dict[str, Any]:  # fmt: skip
    rig = SagaRig(bootstrap, f"{run}-saga.", work / "saga", opts.partitions, opts.workers,
                  **opts.worker_settings)  # fmt: skip
    await rig.prepare()
    names = Topics(rig.settings.topic_prefix)
    cfg = UpstreamConfig(count=opts.payments, seed=2027, manual_capture_rate=0.0,
                         key=opts.upstream_key)  # fmt: skip
    expected = _payments(cfg)
    await produce(bootstrap, codec, cfg, topic=names.initiated)
    bar = Progress(len(expected), "    saga backlog")
    terminal: set[str] = set()
    at90 = t90 = 0.0
    cpu90: dict[str, float] = {}
    rig.start()
    started = 0.0
    before: dict[str, float] = {}
    stats90: dict[str, Any] = {}
    profiler = None
    try:
        async for r in iter_records(bootstrap, names.status, follow=True, timeout=300):
            if not started:  # from the first output: the worker's start-up is not the saga
                started, before = time.monotonic(), rig.cpu(broker_pid)
                if opts.profile is not None:
                    profiler = attach(rig.workers[0].pid, opts.profile / "worker.raw")
            status = codec.decode(r.value, "PaymentStatusChanged")
            if _ended(status) and status["payment_id"] in expected:
                terminal.add(status["payment_id"])
                bar.update(len(terminal))
                if not t90 and len(terminal) >= 0.9 * len(expected):
                    t90, at90, cpu90 = (
                        time.monotonic() - started,
                        len(terminal),
                        rig.cpu(broker_pid),
                    )
                    if profiler is not None:
                        detach(profiler)
                    stats90 = await asyncio.to_thread(rig.stats)
                if len(terminal) >= len(expected):
                    break
    except TimeoutError:
        print(f"\nwarning: {len(terminal)} of {len(expected)} sagas ended", file=sys.stderr)
    finally:
        elapsed = time.monotonic() - started if started else 0.0
        after = rig.cpu(broker_pid)
        before = before or after
        rss = rig.peak_rss_mib()
        if profiler is not None:
            detach(profiler)
        rig.stop()
    bar.close(len(terminal))
    cpu = {k: after[k] - before[k] for k in after}
    cpu_first90 = {k: cpu90.get(k, after[k]) - before[k] for k in after}
    inputs = stats90.get("records", 0)
    batches = stats90.get("batches", 0)
    result: dict[str, Any] = {
        "payments": len(expected), "ended": len(terminal), "seconds": elapsed,
        "payments_per_s": len(terminal) / elapsed if elapsed else 0.0,
        "seconds_first_90": t90, "payments_per_s_first_90": at90 / t90 if t90 else 0.0,
        "cpu_seconds": cpu, "cpu_seconds_first_90": cpu_first90,
        "workers": opts.workers, "partitions": opts.partitions,
        "upstream_key": opts.upstream_key,
        "worker_cpu_ms_per_payment": 1000 * cpu_first90["worker"] / at90 if at90 else 0.0,
        "worker_peak_rss_mib": rss,
        # Engine counters up to the 90 % point (inputs include the start-up's, if any).
        "inputs_per_payment": inputs / at90 if at90 else 0.0,
        "inputs_per_batch": inputs / batches if batches else 0.0,
        "live_records_per_s": inputs / t90 if t90 else 0.0,
    }  # fmt: skip
    result["replay"] = await replay_of(rig.settings)
    if opts.profile is not None and (opts.profile / "worker.raw").exists():
        raw = opts.profile / "worker.raw"
        result["profile"] = {**report(raw), "raw": str(raw)}
    return result


async def replay_of(settings: Settings) -> dict[str, Any]:
    """The live history of `settings` replayed whole and verified (its start-up included)."""
    from paysaga.streams.ops.replay import make_plan, run_replay

    plan = await make_plan(settings, "bench")
    summary = await run_replay(settings, plan, verify=True, out=io.StringIO())
    return {"records": summary.records, "seconds": summary.seconds,
            "working_seconds": summary.working_seconds,
            "records_per_s": summary.working_rate, "verified": summary.verified}  # fmt: skip


async def latency(opts: SagaOptions, bootstrap: str, run: str, work: Path,
                  codec: AvroCodec) -> dict[str, float]:  # fmt: skip
    """p50/p95/p99 ms from a PaymentInitiated's event time to its AUTHORIZED status."""
    rig = SagaRig(bootstrap, f"{run}-saga-lat.", work / "saga-lat", opts.partitions,
                  opts.workers, **opts.worker_settings)  # fmt: skip
    await rig.prepare()
    names = Topics(rig.settings.topic_prefix)
    rig.start()
    try:
        await rig.ready()
        count = int(opts.rate * (opts.warmup_seconds + opts.latency_seconds))
        cfg = UpstreamConfig(count=count, seed=2028, manual_capture_rate=0.0,
                             key=opts.upstream_key)  # fmt: skip
        expected = _payments(cfg)
        measured_from = (time.time() + opts.warmup_seconds) * 1000
        sender = asyncio.create_task(produce(bootstrap, codec, cfg, rate=opts.rate,
                                             topic=names.initiated, progress=False))  # fmt: skip
        initiated: dict[str, int] = {}
        samples: list[float] = []
        seen: set[str] = set()
        ended: set[str] = set()  # authorized, or ended without (declined, refused, ...)
        bar = Progress(len(expected), f"    saga latency @{opts.rate:.0f}/s")
        timeout = (opts.warmup_seconds + opts.latency_seconds) * 6 + 60
        try:
            async for r in iter_records(bootstrap, names.status, follow=True, timeout=timeout):
                now_ms = time.time() * 1000
                status = codec.decode(r.value, "PaymentStatusChanged")
                pid = status["payment_id"]
                if status["status"] == "INITIATED" and not status["replay"]:
                    initiated.setdefault(pid, status["occurred_at"])
                elif status["status"] == "AUTHORIZED" and pid in initiated and pid not in seen:
                    seen.add(pid)
                    if initiated[pid] >= measured_from:
                        samples.append(now_ms - initiated[pid])
                if pid in expected and (status["status"] == "AUTHORIZED" or _ended(status)):
                    ended.add(pid)
                    bar.update(len(ended))
                # Every payment authorized or ended: a declined one never authorizes.
                if len(ended) >= len(expected):
                    break
        except TimeoutError:
            print(f"\nwarning: {len(ended)} of {len(expected)} payments authorized "
                  "or ended", file=sys.stderr)  # fmt: skip
        bar.close(len(ended))
        await sender
    finally:
        rig.stop()
    return {"p50_ms": percentile(samples, 0.50), "p95_ms": percentile(samples, 0.95),
            "p99_ms": percentile(samples, 0.99), "samples": len(samples)}  # fmt: skip


async def run_saga(opts: SagaOptions, bootstrap: str, run: str, work: Path, codec: AvroCodec,
                   broker_pid: int | None) -> dict[str, Any]:  # fmt: skip
    result = await backlog(opts, bootstrap, run, work, codec, broker_pid)
    result["latency"] = await latency(opts, bootstrap, run, work, codec)
    result["rate"] = opts.rate
    return result


def saga_summary(r: dict[str, Any]) -> str:
    cpu = r["cpu_seconds"]
    lat = r["latency"]
    workers = r.get("workers", 1)
    who = "one worker" if workers == 1 else f"{workers} workers"
    lines = [
        f"whole saga: {r['payments']:,} payments (30 % order sagas, 5 % client retries, 1 % "
        f"key conflicts; upstream keys by {r.get('upstream_key', 'payment')}), {who} on "
        f"{r.get('partitions', 3)} partitions and the three simulators",
        f"{'backlog':<12}{'payments/s':>12}{'first 90 %':>12}{'worker CPU/payment':>20}"
        f"{'worker RSS MiB':>16}",
        f"{'':<12}{r['payments_per_s']:>12,.0f}{r['payments_per_s_first_90']:>12,.0f}"
        f"{r['worker_cpu_ms_per_payment']:>17.2f} ms{r['worker_peak_rss_mib']:>16.0f}",
        "CPU seconds over the backlog: " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()),
        f"request to AUTHORIZED at {r['rate']:.0f} payments/s offered: p50 {lat['p50_ms']:.1f} "
        f"ms, p95 {lat['p95_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms ({lat['samples']} samples)",
        f"inputs per payment {r.get('inputs_per_payment', 0):.2f}, per transaction "
        f"{r.get('inputs_per_batch', 0):.1f}",
    ]  # fmt: skip
    if "replay" in r:
        # The same history: the live run's whole backlog against the replay of it. The live
        # first 90 % is the worker at its fastest (large transactions); a replay keeps the
        # live transactions, the tail's small ones (timeouts, retries) included.
        rp, fast = r["replay"], r.get("live_records_per_s", 0.0)
        rate, whole = rp["records_per_s"], rp["records"] / r["seconds"] if r["seconds"] else 0.0
        verdict = "identical" if rp["verified"] else "DIFFERENT"
        lines.append(
            f"replay of the backlog (verify: {verdict}): {rp['records']:,} records in "
            f"{rp.get('working_seconds', 0):.1f} s from its first commit ({rp['seconds']:.1f} s "
            f"with its start-up), {rate:,.0f} records/s; {rate / whole if whole else 0:.2f}x "
            f"the live run of the backlog ({whole:,.0f} records/s over {r['seconds']:.1f} s), "
            f"{rate / fast if fast else 0:.2f}x the live first 90 % ({fast:,.0f} records/s)"
        )
    if "profile" in r:
        lines.append(stage_table(r["profile"], r["worker_cpu_ms_per_payment"],
                                 r.get("inputs_per_payment", 0)))  # fmt: skip
        lines.append(f"py-spy samples of worker 1: {r['profile']['raw']}")
    return "\n".join(lines)
