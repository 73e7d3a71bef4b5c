"""Where a worker's CPU goes: py-spy samples of a live worker, summed by stage.

`paysaga bench --profile DIR` attaches py-spy (a sampling profiler: it reads the worker's
stacks from outside, so the worker runs unchanged) to the whole-saga worker for the backlog
phase. It writes the samples in py-spy's collapsed ("raw") form, which flamegraph tools
read, and `report` sums them by stage: a sample belongs to the first stage a frame matches,
from the innermost frame outwards, so Avro encoding inside an agent counts as encoding and
the rest of the agent's own code as agent glue. Without idle samples (py-spy's default), the
shares are shares of the worker's CPU time.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from paysaga.streams.dev.demo import _stop

#: (stage, match): `match` is a substring of py-spy's "function (file:line)" frame text.
#: Order matters only among frames of one sample: the innermost matching frame decides.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("decode + validate inputs", ("AvroCodec.decode ", "IntakeStep._parse ",
                                  "SagaAgent.decode ", "IntakeStep.decode ")),
    ("encode outputs (Avro)", ("AvroCodec.encode ",)),
    ("payment state load + store", ("Payment.from_json ", "Payment.to_json ",
                                    "TableTransaction.", "KeyedTimers.", "BoundTimers.",
                                    "KeyRecord.")),
    ("saga decisions (domain)", ("domain/saga.py", "domain/lifecycle.py",
                                 "domain/payment.py", "domain/idempotency.py",
                                 "agents/outputs.py")),
    ("agent glue", ("agents/saga.py", "agents/intake.py")),
    ("store apply (RocksDB)", ("PartitionStore.apply ",)),
    ("engine: commit + produce", ("streams/engine/commit.py", "aiokafka/producer/")),
    ("engine: run loop", ("streams/engine/",)),
    ("kafka client: fetch", ("aiokafka/consumer/",)),
    ("kafka client: network + protocol", ("aiokafka/conn.py", "aiokafka/client.py",
                                          "aiokafka/protocol/", "asyncio/")),
)  # fmt: skip
OTHER = "other (start-up, web, faust, ...)"


class ProfilerMissing(RuntimeError):
    """py-spy is not installed (it comes with the test extra: `make venv`)."""


def attach(pid: int, out: Path, rate: int = 100) -> subprocess.Popen[bytes]:
    """Start sampling process `pid` into `out` (collapsed stacks) until `detach`."""
    # The virtualenv's own first (`make venv` installs it there), then PATH.
    exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if exe is None:
        raise ProfilerMissing("py-spy not found on PATH; `make venv` installs it")
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [exe, "record", "--pid", str(pid), "--rate", str(rate), "--nonblocking",
           "--format", "raw", "--output", str(out)]  # fmt: skip
    log = open(out.with_suffix(".log"), "ab")  # noqa: SIM115 - owned by the child
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def detach(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Stop sampling; py-spy writes its output when interrupted."""
    _stop(proc, timeout, signal.SIGINT)


def _samples(raw: Path) -> Iterator[tuple[list[str], int]]:
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            frames = [f for f in stack.split(";") if not f.startswith("process ")]
            yield frames, int(count)


def stage_of(frames: list[str]) -> str:
    """The stage of one sample (its frames outermost first)."""
    for frame in reversed(frames):
        for stage, matches in STAGES:
            if any(m in frame for m in matches):
                return stage
    return OTHER


def report(raw: Path, top: int = 25) -> dict[str, object]:
    """Shares of samples by stage, and the functions with the most samples (inclusive)."""
    stages: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for frames, n in _samples(raw):
        total += n
        stages[stage_of(frames)] += n
        for name in {f.split(" (")[0] for f in frames}:
            inclusive[name] += n
    share = {k: v / total for k, v in stages.most_common()} if total else {}
    hot = [(k, v / total) for k, v in inclusive.most_common(top)] if total else []
    return {"samples": total, "stages": share, "functions": hot}


def stage_table(rep: dict[str, object], cpu_ms_per_payment: float, inputs: float) -> str:
    """The stage shares as lines: % of worker CPU, µs per payment and per input."""
    stages = rep["stages"]
    assert isinstance(stages, dict)
    lines = [f"{'worker CPU by stage':<36}{'share':>7}{'µs/payment':>12}{'µs/input':>10}"]
    for stage, share in stages.items():
        per_payment = share * cpu_ms_per_payment * 1000
        per_input = per_payment / inputs if inputs else 0.0
        lines.append(f"{stage:<36}{share:>6.1%}{per_payment:>12.0f}{per_input:>10.0f}")
    return "\n".join(lines)
