"""A saga given up, its review letter, and the letter's resume, on the test driver (real
RocksDB, no broker): the letter carries a SagaResume and names the resume topic; piped
back as `paysaga dlq redrive` sends it, the saga asks the gateway again, once; the
experiments count the saga once; and a second round of giving up carries the redrive
history, so redrive's cap sees it. Through a broker: tests/e2e/agents/test_e2e_retries.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from paysaga.domain.experiments import VariantStats
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topology import paysaga_topology
from paysaga.streams.engine.deadletter import (
    H_ERROR_CLASS,
    H_KIND,
    H_OFFSET,
    H_REDRIVE_COUNT,
    H_RESUME_TOPIC,
    parse_headers,
)
from paysaga.streams.engine.driver import OutputRecord, TopologyTestDriver
from paysaga.tables.experiments import EXPERIMENTS
from tests.saga_support import CODEC, DriverWorld
from tests.samples import initiated

T0 = 1_790_000_000_000
#: A command unanswered for 1 s is asked about; one retry per level, 1 s then 2 s.
TIMEOUT_MS = 1_000

_seq = iter(range(80_000, 90_000))


@pytest.fixture
def world(tmp_path: Path) -> Iterator[DriverWorld]:
    settings = Settings(partitions=1, command_timeout_ms=TIMEOUT_MS, data_dir=tmp_path,
                        retry_attempts="1,1", retry_variants="X:1:1000,2000")  # fmt: skip
    driver = TopologyTestDriver(paysaga_topology(settings), tmp_path / "state", partitions=1,
                                dlq_topic="payment.dlq", wall_ms=T0)  # fmt: skip
    yield DriverWorld(settings, driver)
    driver.close()


def give_up(world: DriverWorld, pid: str) -> OutputRecord:
    """Silence until the saga gives up on the payment's command: its review letter."""
    for _ in range(20):
        letters = [o for o in world.driver.outputs(world.t.dlq) if o.key == pid.encode()]
        if letters:
            return letters[-1]
        world.driver.advance_wall_clock(TIMEOUT_MS)
    raise AssertionError("the saga never gave up")


def redriven(letter: OutputRecord, count: int) -> list[tuple[str, bytes]]:
    """The headers `paysaga dlq redrive` gives the record it sends (the count is the cap's)."""
    return [("paysaga.redrive.id", b"r-%d" % count),
            (H_REDRIVE_COUNT, str(count).encode())]  # fmt: skip


def stats(world: DriverWorld) -> VariantStats:
    return VariantStats.from_dict(json.loads(world.driver.table(EXPERIMENTS, 0)[b"X"]))


def commands(world: DriverWorld, pid: str, action: str) -> list[dict[str, Any]]:
    return [c for c in world.commands(pid) if c["command_type"] == action]


def test_a_review_letter_resumes_its_saga_once(world: DriverWorld) -> None:
    p = world.initiate(initiated(1, seed=next(_seq), saga="PAYMENT", items=[],
                                 capture_mode="AUTOMATIC", occurred_at=T0)[0])  # fmt: skip
    pid = p["payment_id"]
    auth = world.wait_command(pid, "AUTHORIZE")
    letter = give_up(world, pid)
    h = parse_headers(letter.headers)
    assert (h[H_KIND], h[H_ERROR_CLASS], h[H_OFFSET]) == ("saga", "unknown", "-1")
    assert h[H_RESUME_TOPIC] == world.t.saga_resume
    resume = CODEC.decode(letter.value or b"", "SagaResume")
    assert (resume["payment_id"], resume["idempotency_key"], resume["action"]) == (
        pid, auth["idempotency_key"], "AUTHORIZE")  # fmt: skip
    assert world.statuses(pid)[-1]["saga_state"] == "IN_DOUBT"
    assert (stats(world).sagas, stats(world).successes) == (1, 0)
    asked = len(commands(world, pid, "INQUIRE"))

    world.driver.pipe(world.t.saga_resume, letter.value, letter.key, headers=redriven(letter, 1),
                      timestamp=T0 + 60_000)  # fmt: skip
    assert len(commands(world, pid, "INQUIRE")) == asked + 1
    status = world.statuses(pid)[-1]
    assert status["saga_state"] == "RUNNING" and "resumed by an operator" in status["reason"]
    assert stats(world).sagas == 0  # the IN_DOUBT end is taken back

    # the same letter again (a second ledger, a tombstoned entry): applied once
    world.driver.pipe(world.t.saga_resume, letter.value, letter.key, headers=redriven(letter, 1),
                      timestamp=T0 + 60_000)  # fmt: skip
    assert len(commands(world, pid, "INQUIRE")) == asked + 1
    replay = world.statuses(pid)[-1]
    assert replay["replay"] and "not in doubt any more" in replay["reason"]

    world.answer(auth, "AUTHORIZED")  # the gateway replays the first attempt's outcome
    world.answer(world.wait_command(pid, "CAPTURE"), "CAPTURED")
    final = world.statuses(pid)[-1]
    assert (final["saga_state"], final["terminal"]) == ("COMPLETED", True)
    assert len(commands(world, pid, "AUTHORIZE")) == 1
    assert (stats(world).sagas, stats(world).successes) == (1, 1)


def test_a_resumed_saga_given_up_again_carries_its_redrive_count(world: DriverWorld) -> None:
    p = world.initiate(initiated(1, seed=next(_seq), saga="PAYMENT", items=[],
                                 capture_mode="AUTOMATIC", occurred_at=T0)[0])  # fmt: skip
    pid = p["payment_id"]
    first = give_up(world, pid)
    world.driver.pipe(world.t.saga_resume, first.value, first.key, headers=redriven(first, 1),
                      timestamp=T0 + 60_000)  # fmt: skip
    second = give_up_again(world, pid, first)
    h = parse_headers(second.headers)
    assert h[H_REDRIVE_COUNT] == "1" and h[H_RESUME_TOPIC] == world.t.saga_resume
    assert second.value != first.value  # another doubt: its own SagaResume (and event id)
    assert CODEC.decode(second.value or b"", "SagaResume")["inquiries"] > CODEC.decode(
        first.value or b"", "SagaResume")["inquiries"]  # fmt: skip
    assert stats(world).sagas == 1  # counted once, at its latest end


def give_up_again(world: DriverWorld, pid: str, before: OutputRecord) -> OutputRecord:
    for _ in range(20):
        world.driver.advance_wall_clock(TIMEOUT_MS)
        letters = [o for o in world.driver.outputs(world.t.dlq) if o.key == pid.encode()]
        if letters[-1].value != before.value:
            return letters[-1]
    raise AssertionError("the resumed saga never gave up again")
