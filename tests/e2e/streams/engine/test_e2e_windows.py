"""Event-time windows through a real broker, with SIGKILL: each window closes exactly once.

The window pipeline (tests/pipelines.py) sums inputs per key in 100 ms tumbling windows of
event time. Its worker is killed at random moments while windows close all the time (every
batch moves stream time past some window's end), killed again while it recovers, and once
restarted with its local state deleted. At the end nothing new arrives: the idle policy's
ticks move stream time on and close the last windows. Then, reading committed output only:
no window closed twice, every input counted in exactly one closed window or reported late
once, and no window state left in the local stores.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from paysaga.streams.app.kafka_io import read_all
from paysaga.streams.app.settings import Settings
from paysaga.streams.dev.broker import LocalBroker
from paysaga.tables.store import StoreManager
from tests import pipelines
from tests.support import (
    PacedProducer,
    WorkerProcess,
    isolated_settings,
    kill_losing_state,
    kill_repeatedly,
    wait_for,
)

#: Event time starts an hour ago: a broker refuses timestamps an hour ahead, and its 7-day
#: retention (by record timestamp, which is event time here) would delete older results.
BASE_TS = (int(time.time() * 1000) - 3_600_000) // 100 * 100
KEYS = 12


def _inputs(n: int, seed: int) -> list[tuple[bytes, dict]]:
    """Event time 2 ms apart per input; one in 20 is 150-400 ms behind (late, mostly)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ts = BASE_TS + 2 * i - (rng.randint(150, 400) if rng.random() < 0.05 else 0)
        out.append((f"k{rng.randrange(KEYS)}".encode(),
                    {"seq": i, "amount": rng.randint(1, 1000), "ts": ts}))  # fmt: skip
    return out


def _committed(settings: Settings, topic: str) -> list[dict]:
    return [json.loads(r.value) for r in asyncio.run(read_all(settings.bootstrap, topic))]


def _accounted(settings: Settings) -> int:
    """Inputs accounted for so far: counted in a closed window, or reported late."""
    _, closed, late = pipelines.names(settings)
    return sum(w["count"] for w in _committed(settings, closed)) + len(_committed(settings, late))


def _verify(settings: Settings, inputs: list[tuple[bytes, dict]]) -> tuple[int, int]:
    _, closed_topic, late_topic = pipelines.names(settings)
    closed = _committed(settings, closed_topic)
    late = _committed(settings, late_topic)
    twice = [w for w, n in Counter((c["key"], c["start"]) for c in closed).items() if n > 1]
    assert not twice, f"windows closed twice: {twice[:5]}"
    late_twice = [s for s, n in Counter(x["seq"] for x in late).items() if n > 1]
    assert not late_twice, f"late inputs reported twice: {late_twice[:5]}"
    expected: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for key, v in inputs:
        expected[key.decode()][0] += v["amount"]
        expected[key.decode()][1] += 1
    got: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for c in closed:
        got[c["key"]][0] += c["total"]
        got[c["key"]][1] += c["count"]
    amounts = {v["seq"]: v["amount"] for _, v in inputs}
    for x in late:
        got[x["key"]][0] += amounts[x["seq"]]
        got[x["key"]][1] += 1
    assert dict(got) == dict(expected)
    # Every window closed: none of their state is left (only the store's close marker).
    manager = StoreManager(settings.data_dir / settings.app_id / "state")
    for p in range(settings.partitions):
        store = manager.open(pipelines.WINDOWS, p)
        try:
            left = [k for k, _ in store.items() if k.startswith(b"\x01w/wsum/d/")]
        finally:
            store.close()
        assert not left, f"partition {p}: {len(left)} windows never closed"
    return len(closed), len(late)


@pytest.mark.slow
def test_windows_close_exactly_once_through_kills_and_a_lost_state(
    broker: LocalBroker, tmp_path: Path
) -> None:
    settings = isolated_settings(
        broker.bootstrap, tmp_path / "state", "win", app_id="eos-win", max_batch=50,
        session_timeout_ms=6000, idle_ms=1000, topology="tests.pipelines:window_topology",
    )  # fmt: skip
    pipelines.create_topics(settings)
    inputs = _inputs(200_000, seed=11)  # bounds the test only: the load stops after the kills
    producer = PacedProducer(settings, pipelines.names(settings)[0],
                             [(k, json.dumps(v).encode()) for k, v in inputs], 400)  # fmt: skip
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    producer.start()
    rng = random.Random(4)
    try:
        recovering = kill_repeatedly(worker, 4, lambda: _accounted(settings), 150, producer, rng)
        # Once more, and the local state is lost with it: restored from the changelog.
        kill_losing_state(worker, lambda: _accounted(settings), 150)
        producer.stop()
        producer.join(30)
        assert producer.error is None and not producer.is_alive()
        inputs = inputs[: producer.sent]
        # Nothing arrives any more: only the idle policy's ticks can close the last windows.
        try:
            wait_for(lambda: _accounted(settings) >= len(inputs), 120,
                     what="every window closed")  # fmt: skip
        except AssertionError:
            _verify(settings, inputs)  # says what is missing, if it can
            raise
    except AssertionError as exc:
        raise AssertionError(f"{exc}; {worker.diagnosis()}") from None
    finally:
        worker.stop()
    windows, late = _verify(settings, inputs)
    assert late > 0, "the load made no late inputs: the late path went untested"
    print(f"\nwindows kill test: {len(inputs)} inputs, {windows} windows closed once, "
          f"{late} late; 4 kills, {recovering} while recovering, one losing its state")  # fmt: skip
