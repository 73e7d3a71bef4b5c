"""The gateway's circuit breaker end to end through the broker, with a SIGKILL while it is
open: it opens under a failing gateway, no authorization reaches the gateway while it is
open (by the records' own timestamps), the payments it holds are not failed and spend no
attempt, its state survives the crash, and once the gateway answers again it closes and
every held payment completes, each exactly once. The test plays the gateway.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from paysaga.streams.app.kafka_io import read_all
from paysaga.streams.app.topics import create_topics
from tests.saga_support import CODEC, World
from tests.samples import initiated
from tests.support import WorkerProcess, isolated_settings, wait_for

_seq = iter(range(90_000, 99_000))
#: Opens at 50 % over 4 calls, waits 3 s open, lets 2 trial calls through half open.
SPEC = "threshold=50,window=4,min=4,wait_ms=3000,half_open=2"


def request() -> dict[str, Any]:
    return initiated(1, seed=next(_seq), saga="PAYMENT", items=[], capture_mode="AUTOMATIC")[0]


def transitions(world: World) -> list[dict[str, Any]]:
    records = asyncio.run(read_all(world.settings.bootstrap, world.t.breaker))
    return [CODEC.decode(r.value, "BreakerTransition") for r in records]


def states(world: World) -> list[tuple[str, str]]:
    return [(t["from_state"], t["to_state"]) for t in transitions(world)]


def authorizes(world: World, pid: str | None = None) -> list[dict[str, Any]]:
    return [c for c in world.commands(pid) if c["command_type"] == "AUTHORIZE"]


def test_the_breaker_holds_through_a_crash_then_closes_and_everything_completes(
    broker, tmp_path: Path
) -> None:
    settings = isolated_settings(broker.bootstrap, tmp_path / "state", "breaker", partitions=1,
                                 command_timeout_ms=20_000, punctuate_ms=100, breaker=SPEC,
                                 retry_variants="F:1:2000,2000,2000,2000")  # fmt: skip
    asyncio.run(create_topics(settings))
    log = tmp_path / "worker.log"
    worker = WorkerProcess(settings, log).start()
    world = World(settings)
    try:
        failing = [world.initiate(request())["payment_id"] for _ in range(4)]
        for pid in failing:
            world.answer(world.wait_command(pid, "AUTHORIZE"), "FAILED",
                         code="gateway_unavailable", reason="503", retryable=True)  # fmt: skip
        wait_for(lambda: states(world) == [("closed", "open")], 30, what="the breaker open")
        held = [world.initiate(request())["payment_id"] for _ in range(5)]
        for pid in held:
            world.wait_status(pid, "held", lambda s: "held" in (s["reason"] or ""), timeout=30)
        _, ready = worker.get("/ready/")  # the readiness details show it
        gateway = ready["breakers"]["0"]
        assert (gateway["state"], gateway["transitions"]) == ("open", 1)
        assert gateway["held"] >= 5 and gateway["opened_at_ms"] is not None
        worker.kill()  # while open, with payments held and retries held
        worker = WorkerProcess(settings, log).start()
        wait_for(lambda: len(states(world)) >= 2, 30, what="the wait in the open state ended")
        opened, half = transitions(world)[:2]
        assert (half["from_state"], half["to_state"]) == ("open", "half_open")
        assert half["occurred_at"] - opened["occurred_at"] >= 3_000  # never early
        # No authorization reached the gateway while the breaker was open.
        during = [c for c in authorizes(world)
                  if opened["occurred_at"] <= c["_timestamp"] < half["occurred_at"]]  # fmt: skip
        assert during == [], [(c["payment_id"], c["attempt"], c["_timestamp"]) for c in during]
        for pid in held:  # held, not failed
            assert {s["status"] for s in world.statuses(pid)} == {"INITIATED"}
        # Two trial calls; the gateway is healthy again.
        trials = wait_for(lambda: len(a := [c for c in authorizes(world)
                                            if c["_timestamp"] >= half["occurred_at"]]) >= 2
                          and a, 30, what="the trial calls")  # fmt: skip
        assert len(trials) == 2
        for c in trials:
            world.answer(c, "AUTHORIZED")
        wait_for(lambda: states(world)[-1] == ("half_open", "closed"), 30, what="closed")
        answered = {c["command_id"] for c in trials}
        for pid in failing + held:
            auth = world.wait_command(pid, "AUTHORIZE", n=2 if pid in failing else 1)
            if auth["command_id"] not in answered:
                world.answer(auth, "AUTHORIZED")
            world.answer(world.wait_command(pid, "CAPTURE"), "CAPTURED")
        for pid in failing + held:
            final = world.terminal(pid, timeout=30)
            assert final["saga_state"] == "COMPLETED"
            assert final["retries"] == (1 if pid in failing else 0)  # nothing spent held
            # exactly once: one AUTHORIZE per attempt, one terminal status
            attempts = [c["attempt"] for c in authorizes(world, pid)]
            assert attempts == ([1, 2] if pid in failing else [1]), (pid, attempts)
            assert [s["terminal"] for s in world.statuses(pid)].count(True) == 1
        # One record per transition, none repeated by the crash.
        assert states(world) == [("closed", "open"), ("open", "half_open"),
                                 ("half_open", "closed")]  # fmt: skip
        assert [t["sequence"] for t in transitions(world)] == [1, 2, 3]
        # held when it went half open: the 5 new payments, and the retries that fell due
        assert transitions(world)[0]["held"] == 0 and 5 <= transitions(world)[1]["held"] <= 9
    except AssertionError as exc:
        raise AssertionError(f"{exc}; {worker.diagnosis()}") from None
    finally:
        worker.kill()
