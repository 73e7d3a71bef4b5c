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
- latency: a fresh deployment at a fixed offered rate; per payment, from its
  PaymentInitiated's event time to its AUTHORIZED status being visible to a read_committed
  consumer, after a warm-up at that rate (as the intake comparison measures).

Figures are reported, never asserted (docs/exactly-once.md#how-it-is-measured).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paysaga.schemas.codec import AvroCodec
from paysaga.streams.app.kafka_io import iter_records
from paysaga.streams.app.net import free_port
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import Topics, create_topics
from paysaga.streams.dev.demo import _spawn, _stop
from paysaga.streams.dev.measure import cpu_seconds, peak_rss_mib, percentile
from paysaga.streams.dev.upstream import Progress, UpstreamConfig, generate, produce

SERVICES = ("gateway", "inventory", "shipping")


@dataclass
class SagaOptions:
    payments: int = 10_000
    rate: float = 1000.0
    latency_seconds: float = 10.0
    warmup_seconds: float = 3.0
    partitions: int = 3


class SagaRig:
    """A worker running the payment topology and the three simulators, as processes."""

    def __init__(self, bootstrap: str, prefix: str, work: Path, partitions: int) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.work = work
        self.settings = Settings(
            bootstrap=bootstrap, app_id=prefix.rstrip(".").replace(".", "-"),
            topic_prefix=prefix, partitions=partitions, data_dir=work / "state",
            web_port=free_port(),
        )  # fmt: skip
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PAYSAGA_")}
        for name, value in self.settings.model_dump(mode="json").items():
            if value is not None:
                self.env["PAYSAGA_" + name.upper()] = str(value)
        self.worker: subprocess.Popen[bytes] | None = None
        self.simulators: dict[str, subprocess.Popen[bytes]] = {}

    async def prepare(self) -> None:
        await create_topics(self.settings, log=None)

    def start(self) -> None:
        self.worker = _spawn(["worker"], self.env, self.work / "worker.log")
        for service in SERVICES:
            self.simulators[service] = _spawn(["simulate", service], self.env,
                                              self.work / f"sim-{service}.log")  # fmt: skip

    async def ready(self, timeout: float = 120) -> None:
        url = f"http://127.0.0.1:{self.settings.web_port}/ready/"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=1):
                    return
            except OSError:
                await asyncio.sleep(0.1)  # polling readiness, with a deadline
        raise TimeoutError(f"saga worker not ready; see {self.work / 'worker.log'}")

    def cpu(self, broker_pid: int | None) -> dict[str, float]:
        assert self.worker is not None
        out = {"worker": cpu_seconds(self.worker.pid)}
        out.update({s: cpu_seconds(p.pid) for s, p in self.simulators.items()})
        out["broker"] = cpu_seconds(broker_pid)
        return out

    def stop(self) -> None:
        for proc in [*self.simulators.values(), *([self.worker] if self.worker else [])]:
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
    rig = SagaRig(bootstrap, f"{run}-saga.", work / "saga", opts.partitions)
    await rig.prepare()
    names = Topics(rig.settings.topic_prefix)
    cfg = UpstreamConfig(count=opts.payments, seed=2027, manual_capture_rate=0.0)
    expected = _payments(cfg)
    await produce(bootstrap, codec, cfg, topic=names.initiated)
    bar = Progress(len(expected), "    saga backlog")
    terminal: set[str] = set()
    at90 = t90 = 0.0
    cpu90: dict[str, float] = {}
    rig.start()
    assert rig.worker is not None
    started = 0.0
    before: dict[str, float] = {}
    try:
        async for r in iter_records(bootstrap, names.status, follow=True, timeout=300):
            if not started:  # from the first output: the worker's start-up is not the saga
                started, before = time.monotonic(), rig.cpu(broker_pid)
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
                if len(terminal) >= len(expected):
                    break
    except TimeoutError:
        print(f"\nwarning: {len(terminal)} of {len(expected)} sagas ended", file=sys.stderr)
    finally:
        elapsed = time.monotonic() - started if started else 0.0
        after = rig.cpu(broker_pid)
        before = before or after
        rss = peak_rss_mib(rig.worker.pid)
        rig.stop()
    bar.close(len(terminal))
    cpu = {k: after[k] - before[k] for k in after}
    cpu_first90 = {k: cpu90.get(k, after[k]) - before[k] for k in after}
    return {
        "payments": len(expected), "ended": len(terminal), "seconds": elapsed,
        "payments_per_s": len(terminal) / elapsed if elapsed else 0.0,
        "seconds_first_90": t90, "payments_per_s_first_90": at90 / t90 if t90 else 0.0,
        "cpu_seconds": cpu, "cpu_seconds_first_90": cpu_first90,
        "worker_cpu_ms_per_payment": 1000 * cpu_first90["worker"] / at90 if at90 else 0.0,
        "worker_peak_rss_mib": rss,
    }  # fmt: skip


async def latency(opts: SagaOptions, bootstrap: str, run: str, work: Path,
                  codec: AvroCodec) -> dict[str, float]:  # fmt: skip
    """p50/p95/p99 ms from a PaymentInitiated's event time to its AUTHORIZED status."""
    rig = SagaRig(bootstrap, f"{run}-saga-lat.", work / "saga-lat", opts.partitions)
    await rig.prepare()
    names = Topics(rig.settings.topic_prefix)
    rig.start()
    try:
        await rig.ready()
        count = int(opts.rate * (opts.warmup_seconds + opts.latency_seconds))
        cfg = UpstreamConfig(count=count, seed=2028, manual_capture_rate=0.0)
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
    return "\n".join([
        f"whole saga: {r['payments']:,} payments (30 % order sagas, 5 % client retries, 1 % "
        "key conflicts), one worker and the three simulators",
        f"{'backlog':<12}{'payments/s':>12}{'first 90 %':>12}{'worker CPU/payment':>20}"
        f"{'worker RSS MiB':>16}",
        f"{'':<12}{r['payments_per_s']:>12,.0f}{r['payments_per_s_first_90']:>12,.0f}"
        f"{r['worker_cpu_ms_per_payment']:>17.2f} ms{r['worker_peak_rss_mib']:>16.0f}",
        "CPU seconds over the backlog: " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()),
        f"request to AUTHORIZED at {r['rate']:.0f} payments/s offered: p50 {lat['p50_ms']:.1f} "
        f"ms, p95 {lat['p95_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms ({lat['samples']} samples)",
    ])  # fmt: skip
