"""The saga's circuit breaker on the gateway, on the test driver (real RocksDB, no broker):
it opens under failures, holds payments without failing them or spending their attempts,
lets a few through half open, closes, and releases what it held, oldest first, with one
transition record per change. The same runs through a broker in
tests/e2e/agents/test_e2e_breaker.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from paysaga.domain.breaker import Breaker, BreakerConfig, BreakerState
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topology import paysaga_topology
from paysaga.streams.engine.driver import TopologyTestDriver
from paysaga.tables.breaker import BREAKER, GATEWAY
from paysaga.tables.payments import PAYMENTS
from tests.saga_support import CODEC, DriverWorld
from tests.samples import initiated

T0 = 1_790_000_000_000
#: Opens at 50 % over 4 calls, waits 5 s, lets 2 through half open.
SPEC = "threshold=50,window=4,min=4,wait_ms=5000,half_open=2"
#: One variant with 1 s retries, so the retry timers are easy to reason about.
VARIANTS = "ONE:1:1000,1000,1000,1000"

_seq = iter(range(70_000, 80_000))


@pytest.fixture
def world(tmp_path: Path) -> Iterator[DriverWorld]:
    settings = Settings(partitions=1, command_timeout_ms=10_000, data_dir=tmp_path,
                        breaker=SPEC, retry_variants=VARIANTS)  # fmt: skip
    driver = TopologyTestDriver(paysaga_topology(settings), tmp_path / "state", partitions=1,
                                dlq_topic="payment.dlq", wall_ms=T0)  # fmt: skip
    yield DriverWorld(settings, driver)
    driver.close()


def request() -> dict[str, Any]:
    defaults = {"saga": "PAYMENT", "items": [], "capture_mode": "AUTOMATIC", "occurred_at": T0}
    return initiated(1, seed=next(_seq), **defaults)[0]


def transitions(world: DriverWorld) -> list[tuple[str, str]]:
    out = [CODEC.decode(r.value or b"", "BreakerTransition") for r in world.driver.outputs()
           if r.topic == world.t.breaker]  # fmt: skip
    assert [t["sequence"] for t in out] == list(range(1, len(out) + 1))
    return [(t["from_state"], t["to_state"]) for t in out]


def breaker(world: DriverWorld) -> Breaker:
    raw = world.driver.table(BREAKER, 0)[GATEWAY]
    return Breaker.from_json(raw.partition(b"|")[2], BreakerConfig.parse(SPEC))


def stored(world: DriverWorld, pid: str) -> dict[str, Any]:
    return json.loads(world.driver.table(PAYMENTS, 0)[pid.encode()])


def authorizes(world: DriverWorld, pid: str) -> list[dict[str, Any]]:
    return [c for c in world.commands(pid) if c["command_type"] == "AUTHORIZE"]


def fail(world: DriverWorld, cmd: dict[str, Any]) -> None:
    world.answer(cmd, "FAILED", code="gateway_unavailable", reason="503", retryable=True)


def open_breaker(world: DriverWorld) -> list[str]:
    """Four payments whose first AUTHORIZE the gateway answers 503: the breaker opens."""
    pids = []
    for _ in range(4):
        p = world.initiate(request())
        fail(world, world.wait_command(p["payment_id"], "AUTHORIZE"))
        pids.append(p["payment_id"])
    assert transitions(world) == [("closed", "open")]
    return pids


def test_the_breaker_opens_under_failures_and_holds_without_failing(world: DriverWorld) -> None:
    failing = open_breaker(world)
    new = world.initiate(request())["payment_id"]
    assert authorizes(world, new) == []  # held: nothing reached the gateway
    held = stored(world, new)["outstanding"][f"{new}:authorize:action"]
    assert (held["phase"], held["attempt"]) == ("HELD", 0)
    assert "held" in world.statuses(new)[-1]["reason"]
    assert world.statuses(new)[-1]["status"] == "INITIATED"  # not failed
    # The failing payments' retries fall due while it is open: held too, no attempt spent.
    world.driver.advance_wall_clock(1_000)
    for pid in failing:
        assert len(authorizes(world, pid)) == 1
        o = stored(world, pid)["outstanding"][f"{pid}:authorize:action"]
        assert (o["phase"], o["attempt"], o["retries"]) == ("HELD", 1, 1)
    assert world.driver.table(BREAKER, 0)[b"held-count"] == b"5"
    assert breaker(world).state is BreakerState.OPEN
    assert transitions(world) == [("closed", "open")]  # one record, not one per payment


def test_it_is_never_half_open_early_then_closes_and_releases_everything(
    world: DriverWorld,
) -> None:
    failing = open_breaker(world)
    late = [world.initiate(request())["payment_id"] for _ in range(3)]
    world.driver.advance_wall_clock(4_999)  # the retries are due, the wait is not over
    assert transitions(world) == [("closed", "open")]
    assert sum(len(authorizes(world, pid)) for pid in failing + late) == 4
    world.driver.advance_wall_clock(1)
    assert transitions(world) == [("closed", "open"), ("open", "half_open")]
    # Two trial calls, for the payments held longest: the new ones, held as they came
    # (the failing ones were held when their retries fell due, 5 s later).
    trials = [c for pid in late for c in authorizes(world, pid)]
    assert [c["payment_id"] for c in trials] == late[:2]
    assert [c["attempt"] for c in trials] == [1, 1]  # a first attempt, though it waited
    for c in trials:
        world.answer(c, "AUTHORIZED")
    assert transitions(world)[-1] == ("half_open", "closed")
    world.driver.advance_wall_clock(100)  # the next punctuation releases the rest
    assert [c["attempt"] for c in authorizes(world, late[2])] == [1]
    for pid in failing:
        assert [c["attempt"] for c in authorizes(world, pid)] == [1, 2]  # no attempt burnt
    for pid in failing + late:
        if pid not in late[:2]:
            world.answer(authorizes(world, pid)[-1], "AUTHORIZED")
        world.answer(world.wait_command(pid, "CAPTURE"), "CAPTURED")
        final = world.terminal(pid)
        assert final["saga_state"] == "COMPLETED"
        assert final["retries"] == (1 if pid in failing else 0)
    assert transitions(world) == [("closed", "open"), ("open", "half_open"),
                                  ("half_open", "closed")]  # fmt: skip
    assert world.driver.table(BREAKER, 0)[b"held-count"] == b"0"
    assert stored(world, late[0])["held_at"] is None


def test_a_failed_trial_reopens_and_the_wait_starts_again(world: DriverWorld) -> None:
    failing = open_breaker(world)
    world.driver.advance_wall_clock(1_000)  # their retries fall due: held
    world.driver.advance_wall_clock(4_000)
    trials = [c for pid in failing for c in authorizes(world, pid) if c["attempt"] == 2]
    assert [c["payment_id"] for c in trials] == failing[:2]
    for c in trials:
        fail(world, c)
    assert transitions(world)[-1] == ("half_open", "open")
    world.driver.advance_wall_clock(4_999)
    assert transitions(world)[-1] == ("half_open", "open")
    assert len([c for pid in failing for c in authorizes(world, pid)]) == 6
    world.driver.advance_wall_clock(1)
    assert transitions(world)[-1] == ("open", "half_open")


def test_silence_is_not_counted(world: DriverWorld) -> None:
    """An answer past its deadline may be unread in the worker's own input: a worker behind
    must not open the breaker on the gateway."""
    for _ in range(4):
        world.initiate(request())
    world.driver.advance_wall_clock(10_000)  # four AUTHORIZEs without an answer
    assert transitions(world) == []
    assert len([c for c in world.commands() if c["command_type"] == "INQUIRE"]) == 4
    assert GATEWAY not in world.driver.table(BREAKER, 0)  # nothing recorded: still closed


def test_declines_are_the_gateway_working(world: DriverWorld) -> None:
    for _ in range(6):
        p = world.initiate(request())
        world.answer(world.wait_command(p["payment_id"], "AUTHORIZE"), "FAILED",
                     reason="card declined")  # fmt: skip
    assert transitions(world) == []
    assert breaker(world).state is BreakerState.CLOSED


def test_the_readiness_details_describe_the_task_breaker(world: DriverWorld) -> None:
    from paysaga.tables.breaker import describe

    config = BreakerConfig.parse(SPEC)
    nothing: dict[bytes, bytes] = {}
    empty = describe(nothing.get, config)
    assert (empty["state"], empty["held"], empty["transitions"]) == ("closed", 0, 0)
    open_breaker(world)
    world.initiate(request())
    table = world.driver.table(BREAKER, 0)
    got = describe(table.get, config)
    assert (got["state"], got["held"], got["transitions"]) == ("open", 1, 1)
    assert got["opened_at_ms"] == T0


def test_only_the_answer_to_the_awaited_call_counts(world: DriverWorld) -> None:
    """A late answer to an earlier inquiry is not a second outcome of the call out now."""
    pid = world.initiate(request())["payment_id"]
    world.driver.advance_wall_clock(10_000)  # AUTHORIZE unanswered: INQUIRE 1
    first = world.wait_command(pid, "INQUIRE")
    world.driver.advance_wall_clock(10_000)  # INQUIRE 1 unanswered: asked again in 1 s
    world.answer(first, "FAILED", code="never_seen", reason="never seen", retryable=True)
    assert GATEWAY not in world.driver.table(BREAKER, 0)  # late: nothing counted
    world.driver.advance_wall_clock(1_000)
    second = world.wait_command(pid, "INQUIRE", n=2)
    world.answer(second, "FAILED", code="never_seen", reason="never seen", retryable=True)
    b = breaker(world)
    assert (b.window_calls, b.window_failures) == (1, 0)  # the awaited answer: a success


def test_nothing_about_a_settlement_is_gated() -> None:
    from paysaga.domain.saga import Command, Orchestrator

    def cmd(action: str, step: str) -> Command:
        return Command("payment", action, step, "post", 1, "c", "k", 1)

    assert not Orchestrator.gateway_call(cmd("SETTLE", "settle"))
    assert not Orchestrator.gateway_call(cmd("INQUIRE", "settle"))
    assert Orchestrator.gateway_call(cmd("INQUIRE", "authorize"))
    assert not Orchestrator.gateway_call(Command("inventory", "RESERVE", "reserve", "action",
                                                 1, "c", "k", 0))  # fmt: skip


def test_a_trial_whose_calls_stay_unanswered_reopens_after_its_max_wait(
    tmp_path: Path,
) -> None:
    spec = SPEC + ",half_open_max_ms=3000"  # shorter than the 10 s command timeout
    settings = Settings(partitions=1, command_timeout_ms=10_000, data_dir=tmp_path,
                        breaker=spec, retry_variants=VARIANTS)  # fmt: skip
    driver = TopologyTestDriver(paysaga_topology(settings), tmp_path / "state", partitions=1,
                                dlq_topic="payment.dlq", wall_ms=T0)  # fmt: skip
    world = DriverWorld(settings, driver)
    try:
        open_breaker(world)
        world.driver.advance_wall_clock(5_000)  # half open: two trials out, never answered
        assert transitions(world)[-1] == ("open", "half_open")
        world.driver.advance_wall_clock(2_999)
        assert transitions(world)[-1] == ("open", "half_open")
        world.driver.advance_wall_clock(1)
        assert transitions(world)[-1] == ("half_open", "open")  # not stuck half open
        world.driver.advance_wall_clock(5_000)
        assert transitions(world)[-1] == ("open", "half_open")  # and it tries again
    finally:
        driver.close()


def test_half_open_the_trial_permits_go_to_the_payments_held_longest(world: DriverWorld) -> None:
    open_breaker(world)
    waiting = [world.initiate(request())["payment_id"] for _ in range(3)]  # held, in order
    world.driver.clock.now_ms += 5_000  # the wait is over; no punctuation has run yet
    newcomer = world.initiate(request())["payment_id"]
    assert transitions(world)[-1] == ("open", "half_open")  # decided by the newcomer's call
    assert authorizes(world, newcomer) == []  # it waits behind the held ones
    world.driver.advance_wall_clock(0)  # the breaker's timer: the two oldest go out
    assert [len(authorizes(world, pid)) for pid in waiting] == [1, 1, 0]
    assert authorizes(world, newcomer) == []
