"""`make run`: broker, topics, worker, simulators and producer together, with live progress.

Ctrl-C (or SIGTERM, SIGHUP) stops everything this command started, in reverse order; a
broker that was already running before is left running. Whatever the output is connected
to: under `make run | tee run.log`, Ctrl-C kills `tee` too, and a print to its dead pipe
must not cut the shutdown short (it used to, leaving the broker, the worker and the
simulators running). The live view is the worker's own `/metrics`
(streams/ops/dashboard.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from paysaga.streams.app.net import free_port
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import create_topics
from paysaga.streams.dev.broker import LocalBroker


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    out = open(log, "ab")  # noqa: SIM115 - owned by the child
    return subprocess.Popen(
        [sys.executable, "-m", "paysaga.streams.ops.cli", *args],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen, timeout: float = 20.0, sig: int = signal.SIGTERM) -> None:
    """Ask `proc` to stop with `sig`; kill it if it has not within `timeout` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _stop_all(procs: list[subprocess.Popen], timeout: float = 20.0) -> None:
    """SIGTERM each (in the order given), then wait for all within one deadline, and
    SIGKILL whoever is left: a slow one does not hold up the others' stop."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def say(*parts: object) -> None:
    """Print, unless whoever read our output is gone (a dead pipe); then stdout goes to
    /dev/null, so neither this shutdown nor the interpreter's exit trips over it again."""
    try:
        print(*parts, flush=True)
    except (BrokenPipeError, OSError):
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())


def _wait_http(url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as resp:
            if resp.status == 200:
                return True
        time.sleep(0.3)
    return False


def run_demo(settings: Settings, count: int, rate: float, port: int, broker_dir: Path,
             outage_every_ms: int = 0, outage_ms: int = 0) -> int:  # fmt: skip
    broker = LocalBroker(broker_dir, port)
    owned_broker = broker.pid() is None
    say(f"starting the local Kafka broker on 127.0.0.1:{port} ...")
    took = broker.up(log=say)
    say(f"broker ready in {took:.1f}s (log {broker.log_file})")
    web_port = settings.web_port or free_port()
    settings = settings.model_copy(update={"bootstrap": broker.bootstrap, "web_port": web_port})
    result = asyncio.run(create_topics(settings))
    say(f"topics: {sum(v == 'created' for v in result.values())} created, {len(result)} total")
    logs = Path(settings.data_dir)
    logs.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PAYSAGA_BOOTSTRAP": settings.bootstrap,
        "PAYSAGA_DATA_DIR": str(settings.data_dir),
        "PAYSAGA_WEB_PORT": str(web_port),
        "PAYSAGA_PARTITIONS": str(settings.partitions),
        # Reconciliation windows short enough to watch them close (1 min, 30 s of grace);
        # the bank feed's late lines (3 min) then arrive after their window closed.
        "PAYSAGA_RECON_WINDOW_MS": os.environ.get("PAYSAGA_RECON_WINDOW_MS", "60000"),
        "PAYSAGA_RECON_GRACE_MS": os.environ.get("PAYSAGA_RECON_GRACE_MS", "30000"),
        # Settlement batches of a minute, submitted 10 s after they end (docs/settlement.md).
        "PAYSAGA_SETTLEMENT_BATCH_MS": os.environ.get("PAYSAGA_SETTLEMENT_BATCH_MS", "60000"),
        "PAYSAGA_SETTLEMENT_CUTOFF_MS": os.environ.get("PAYSAGA_SETTLEMENT_CUTOFF_MS", "10000"),
    }
    procs: list[subprocess.Popen] = []

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    # SIGINT too: started from a shell's background job, a process inherits SIGINT ignored,
    # and Python then never raises KeyboardInterrupt; the demo must stop on Ctrl-C anyway.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    try:
        worker = _spawn(["worker"], env, logs / "worker.log")
        procs.append(worker)
        base = f"http://{settings.web_host}:{web_port}"
        if not _wait_http(base + "/health/", 60):
            print(f"error: worker did not come up; see {logs / 'worker.log'}", file=sys.stderr)
            return 1
        say(f"worker up; web views: {base}/payments/<payment_id>  {base}/ready  "
            f"{base}/dlq  {base}/metrics; payments API: {base}/v1/payments "
            f"(docs/api.md, described at {base}/openapi.json)  "
            f"(worker log {logs / 'worker.log'})")  # fmt: skip
        outage = ["--outage-every-ms", str(outage_every_ms), "--outage-ms", str(outage_ms)]
        for service in ("gateway", "inventory", "shipping", "bank"):
            extra = outage if service == "gateway" and outage_ms > 0 else []
            procs.append(_spawn(["simulate", service, *extra], env, logs / f"sim-{service}.log"))
        if outage_ms > 0:
            say(f"the gateway has an outage of {outage_ms / 1000:.0f}s every "
                f"{outage_every_ms / 1000:.0f}s (503s): watch the retries, the breaker "
                "open and close, and the DLQ")  # fmt: skip
        say("simulators up: card gateway, inventory, shipping, the bank's statement feed "
            f"(logs {logs}/sim-*.log)")  # fmt: skip
        producer = _spawn(
            ["produce", "--count", str(count), "--rate", str(rate), "--invalid-rate", "0.002"],
            env,
            logs / "producer.log",
        )
        procs.append(producer)
        say(f"producing {count} payments at {rate:.0f}/s; live view below "
            "(Ctrl-C stops everything)")  # fmt: skip
        from paysaga.streams.ops.dashboard import run_dashboard

        run_dashboard(base, settings.web_token, out=sys.stdout)
    except (KeyboardInterrupt, BrokenPipeError):
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut this short
        say("\nstopping ...")
        _stop_all(list(reversed(procs)))
        if owned_broker:
            broker.down()
        say("stopped")
    return 0
