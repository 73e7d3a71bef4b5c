"""`make run` as a new user runs it, with its output piped to `tee`: the live view is one
plain line per interval (no TTY), under 160 columns; and Ctrl-C (SIGINT to the whole
foreground process group, `tee` included) stops everything the demo started: the broker,
the worker, the simulators and the producer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from paysaga.streams.app.net import free_port
from paysaga.streams.app.settings import Settings
from paysaga.streams.dev.broker import LocalBroker
from tests.support import WorkerProcess, wait_for


def _children(pid: int) -> set[int]:
    """Processes whose parent is `pid` (from /proc)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            out.add(int(entry.name))
    return out


def _terminal_like() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _describe(pids: set[int]) -> str:
    out = []
    for p in sorted(pids):
        if _alive(p):
            try:
                out.append(f"{p}: {Path(f'/proc/{p}/cmdline').read_bytes()[:120]!r}")
            except OSError:
                continue
    return "; ".join(out)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"  # a zombie has exited


def test_ctrl_c_under_tee_stops_everything_the_demo_started(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    broker_dir = tmp_path / "broker"
    web_port = free_port()
    demo = [sys.executable, "-m", "paysaga.streams.ops.cli", "demo", "--count", "100000",
            "--rate", "50", "--broker-port", str(free_port()), "--broker-data-dir",
            str(broker_dir), "--data-dir", str(tmp_path / "data"), "--web-port",
            str(web_port), "--outage-ms", "0"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYSAGA_")}
    # As from a terminal: SIGINT not ignored (a test run in a background job inherits it
    # ignored, and so would tee), the pipeline its own process group.
    started: set[int] = set()
    shell = subprocess.Popen(["bash", "-c", " ".join(demo) + f" 2>&1 | tee {log}"], env=env,
                             stdout=subprocess.DEVNULL, start_new_session=True,
                             preexec_fn=_terminal_like)  # fmt: skip
    try:

        def live() -> list[str] | None:
            lines = log.read_text().splitlines() if log.exists() else []
            after = lines[next((i for i, x in enumerate(lines) if "live view below" in x),
                               len(lines)) + 1:]  # fmt: skip
            return after if len([x for x in after if "rec/s" in x]) >= 2 else None

        lines = wait_for(live, 150, what=f"the demo's live lines ({log})")
        assert all(len(x) < 160 for x in lines), lines
        shown = log.read_text()
        assert "/v1/payments" in shown and "/openapi.json" in shown and "/dlq" in shown
        # The API and the views answer beside the simulated traffic: a payment made through
        # the API is authorized by the gateway simulator while the producer runs.
        worker = WorkerProcess(Settings(web_port=web_port), tmp_path / "unused.log")
        code, raw, _ = worker.call("POST", "/v1/payments?wait=20000", {
            "merchant_id": "m_demo", "customer_id": "c_demo", "order_id": "ord_demo",
            "amount_minor": 1234, "currency": "EUR", "card_token": "tok_demo_abc",
            "country": "DE"}, {"Idempotency-Key": "demo-1"}, timeout=30)  # fmt: skip
        made = json.loads(raw)
        assert code == 200 and made["payment"]["status"] != "INITIATED", made
        code, stored = worker.get(f"/payments/{made['id']}")
        assert code == 200 and stored["amount_minor"] == 1234
        code, dlq = worker.get("/dlq")
        assert code == 200 and dlq["total"] >= 0
        [python] = [p for p in _children(shell.pid)
                    if "demo" in Path(f"/proc/{p}/cmdline").read_text()]  # fmt: skip
        started |= _children(python)
        broker_pid = LocalBroker(broker_dir, 0).pid()
        assert broker_pid is not None and len(started) >= 6  # worker, 4 simulators, producer
        os.killpg(shell.pid, signal.SIGINT)  # the terminal's Ctrl-C: tee dies with the rest
        everything = started | {broker_pid, python}
        try:
            wait_for(lambda: not any(_alive(p) for p in everything), 90,
                     what="every process the demo started to exit")  # fmt: skip
        except AssertionError as exc:
            raise AssertionError(f"{exc}; still alive: {_describe(everything)}") from None
    finally:
        # A failure must not leave the demo's processes (each in its own session) running
        # and eating the CPU of the tests after this one.
        for pid in started:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGKILL)
        shell.wait(30)
        leftover = LocalBroker(broker_dir, 0).pid()
        if leftover is not None and _alive(leftover):
            os.kill(leftover, signal.SIGKILL)
