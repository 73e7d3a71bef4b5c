"""Retries end to end through the broker: levels and their delays, never early, inquiries
about unanswered keys, declines never retried, exhaustion to the DLQ, and a payment waiting
at a long level holding up nobody. The test plays the gateway; delays are short and
configurable (`PAYSAGA_RETRY_VARIANTS`), except in the test of the real 1 s level.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from paysaga.domain.retry import RetryPolicy
from paysaga.streams.app.topics import create_topics
from paysaga.streams.engine.deadletter import H_ERROR_CLASS, H_REDRIVE_ID, H_RESUME_TOPIC
from tests.saga_support import World
from tests.samples import initiated
from tests.support import WorkerProcess, isolated_settings, paysaga, produce, redrive, wait_for

_seq = iter(range(50_000, 60_000))
#: One variant, short levels: 0.3 s, 0.6 s, 0.9 s, then a long 300 s level.
FAST = "FAST:1:300,600,900,300000"


def request(**overrides) -> dict:
    n = next(_seq)
    defaults = {"saga": "PAYMENT", "items": [], "capture_mode": "AUTOMATIC"}
    return initiated(1, seed=n, **{**defaults, **overrides})[0]


@pytest.fixture(scope="module")
def world(broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp: Path = tmp_path_factory.mktemp("retries")
    settings = isolated_settings(broker.bootstrap, tmp / "state", "retries",
                                 command_timeout_ms=1_500, punctuate_ms=100,
                                 retry_attempts="2,2,2,3", retry_variants=FAST)  # fmt: skip
    asyncio.run(create_topics(settings))
    worker = WorkerProcess(settings, tmp / "worker.log").start()
    yield World(settings)
    worker.kill()


@contextlib.contextmanager
def own_worker(broker, tmp_path: Path, name: str,
               **overrides: Any) -> Iterator[tuple[World, WorkerProcess]]:  # fmt: skip
    """A worker of its own (topics, settings) for a test that needs other settings than
    the module's; SIGKILLed at the end."""
    settings = isolated_settings(broker.bootstrap, tmp_path / "state", name, punctuate_ms=100,
                                 **overrides)  # fmt: skip
    asyncio.run(create_topics(settings))
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        yield World(settings), worker
    finally:
        worker.kill()


def never_early(world: World, pid: str) -> None:
    """Every retry went out at or after its due time, by the records' own timestamps."""
    sent = {c["command_id"]: c["_timestamp"] for c in world.commands(pid)}
    for r in world.retries(pid):
        if r["command_id"] in sent:
            assert sent[r["command_id"]] >= r["due_at"], r


def test_a_transient_failure_recovers_at_level_two(world: World) -> None:
    p = world.initiate(request())
    pid = p["payment_id"]
    for n in range(1, 4):
        cmd = world.wait_command(pid, "AUTHORIZE", n=n)
        world.answer(cmd, "FAILED", code="gateway_unavailable", retryable=True,
                     reason="503")  # fmt: skip
    world.answer(world.wait_command(pid, "AUTHORIZE", n=4), "AUTHORIZED")
    world.answer(world.wait_command(pid, "CAPTURE"), "CAPTURED")
    final = world.terminal(pid)
    assert final["saga_state"] == "COMPLETED" and final["retry_variant"] == "FAST"
    assert final["retries"] == 3
    retries = world.retries(pid)
    assert [(r["level"], r["delay_ms"], r["attempt"]) for r in retries] == [
        (1, 300, 2), (1, 300, 3), (2, 600, 4)]  # fmt: skip
    assert {r["error_class"] for r in retries} == {"transient"}
    keys = {c["idempotency_key"] for c in world.commands(pid) if c["command_type"] == "AUTHORIZE"}
    assert keys == {f"{pid}:authorize:action"}
    never_early(world, pid)


def test_declines_are_never_retried(world: World) -> None:
    p = world.initiate(request())
    pid = p["payment_id"]
    world.answer(world.wait_command(pid, "AUTHORIZE"), "FAILED", reason="card declined")
    final = world.terminal(pid)
    assert (final["status"], final["retries"]) == ("FAILED", 0)
    assert [c["command_type"] for c in world.commands(pid)] == ["AUTHORIZE"]
    assert world.retries(pid) == []


def test_an_unknown_outcome_the_gateway_acted_on_is_resolved_without_a_second_authorization(
    world: World,
) -> None:
    p = world.initiate(request())
    pid = p["payment_id"]
    auth = world.wait_command(pid, "AUTHORIZE")  # and then silence: the answer was lost
    inquiry = world.wait_command(pid, "INQUIRE", timeout=30)
    assert inquiry["idempotency_key"] == auth["idempotency_key"]
    world.answer(auth, "AUTHORIZED")  # the gateway replays what it recorded for the key
    world.answer(world.wait_command(pid, "CAPTURE"), "CAPTURED")
    assert world.terminal(pid)["saga_state"] == "COMPLETED"
    assert [c["command_type"] for c in world.commands(pid)].count("AUTHORIZE") == 1


def test_a_key_the_gateway_never_saw_is_sent_again_with_the_same_key(world: World) -> None:
    p = world.initiate(request())
    pid = p["payment_id"]
    auth = world.wait_command(pid, "AUTHORIZE")
    inquiry = world.wait_command(pid, "INQUIRE", timeout=30)
    world.answer(inquiry, "FAILED", code="never_seen", reason="never seen", retryable=True)
    again = world.wait_command(pid, "AUTHORIZE", n=2)
    assert (again["idempotency_key"], again["attempt"]) == (auth["idempotency_key"], 2)
    world.answer(again, "AUTHORIZED")
    world.answer(world.wait_command(pid, "CAPTURE"), "CAPTURED")
    assert world.terminal(pid)["saga_state"] == "COMPLETED"
    never_early(world, pid)


def test_a_payment_waiting_at_the_long_level_holds_up_nobody(world: World) -> None:
    slow = world.initiate(request())
    sid = slow["payment_id"]
    for n in range(1, 7):  # six 503s: levels 1, 1, 2, 2, 3, 3; the seventh waits 300 s
        cmd = world.wait_command(sid, "AUTHORIZE", n=n)
        world.answer(cmd, "FAILED", code="gateway_unavailable", retryable=True, reason="503")
    wait_for(lambda: len(world.retries(sid)) == 7, 30, what="the level-4 retry")
    level4 = world.retries(sid)[-1]
    assert (level4["level"], level4["delay_ms"]) == (4, 300_000)
    others = [world.initiate(request()) for _ in range(5)]
    for o in others:  # same partitions, same worker: they complete meanwhile
        world.answer(world.wait_command(o["payment_id"], "AUTHORIZE"), "AUTHORIZED")
        world.answer(world.wait_command(o["payment_id"], "CAPTURE"), "CAPTURED")
        assert world.terminal(o["payment_id"])["saga_state"] == "COMPLETED"
    # the waiting payment's later events are processed in order against its state:
    # the late answer to its first attempt authorizes it, and the retry is not sent
    world.answer(world.wait_command(sid, "AUTHORIZE", n=1), "AUTHORIZED")
    world.answer(world.wait_command(sid, "CAPTURE"), "CAPTURED")
    assert world.terminal(sid)["saga_state"] == "COMPLETED"
    assert [c["command_type"] for c in world.commands(sid)].count("AUTHORIZE") == 7
    never_early(world, sid)


def test_the_experiments_report_counts_every_ended_saga(world: World) -> None:
    """`paysaga experiments report`, as an operator runs it, from the committed changelog:
    the sagas the tests above ended, with their success rate and retries."""
    ended = [s for s in world.statuses() if s["terminal"]]
    ok = sum(s["saga_state"] == "COMPLETED" for s in ended)
    retries = sum(s["retries"] for s in ended)
    assert ended and ok < len(ended)  # a decline is among them

    def report() -> str | None:
        r = paysaga(world.settings, "experiments", "report")
        assert r.returncode == 0, r.stderr
        return r.stdout if f"{len(ended)} ended sagas" in r.stdout else None

    text = wait_for(report, 30, what="the report counting every ended saga")
    row = next(line for line in text.splitlines()
               if [c.strip() for c in line.split("│")][1:2] == ["FAST"])  # fmt: skip
    assert f"{100 * ok / len(ended):.2f}%" in row
    assert f"{retries / len(ended):.3f}" in row


def test_exhausted_retries_land_in_the_dlq_with_every_header(broker, tmp_path: Path) -> None:
    with own_worker(broker, tmp_path, "exhaust", command_timeout_ms=5_000,
                    retry_attempts="1,1", retry_variants="X:1:100,200") as (world, _):  # fmt: skip
        p = world.initiate(request())
        pid = p["payment_id"]
        for n in range(1, 4):
            cmd = world.wait_command(pid, "AUTHORIZE", n=n)
            world.answer(cmd, "FAILED", code="gateway_unavailable", retryable=True, reason="503")
        final = world.terminal(pid)
        assert (final["saga_state"], final["status"], final["retries"]) == ("FAILED", "FAILED", 2)
        [(key, h)] = wait_for(world.dead_letters, 30, what="the review letter")
        assert key == pid.encode() and h["paysaga.error.kind"] == "saga"
        assert h["paysaga.error.class"] == "transient"
        assert "AUTHORIZE given up after 2 retries" in h["paysaga.error.reason"]
        for name in ("paysaga.source.topic", "paysaga.first_failed_at", "paysaga.last_failed_at",
                     "paysaga.attempts"):  # fmt: skip
            assert name in h, name
        assert [r["level"] for r in world.retries(pid)] == [1, 2]


def test_a_saga_given_up_in_doubt_is_resumed_by_a_redrive_exactly_once(
    broker, tmp_path: Path
) -> None:
    """The gateway is silent through every level: the saga ends IN_DOUBT and its review
    letter names the resume topic. After the fix, `paysaga dlq redrive` resumes it, and the
    worker is SIGKILLed and restarted while the resume is read: it is applied once, the
    gateway replays what it recorded, the saga completes. Redriven again, the ledger skips
    it; with its ledger entry deleted, the copy is sent and changes nothing."""
    with own_worker(broker, tmp_path, "resume", command_timeout_ms=1_000, retry_attempts="1,1",
                    retry_variants="X:1:100,200") as (world, worker):  # fmt: skip
        settings = world.settings
        t = world.t
        p = world.initiate(request())
        pid = p["payment_id"]
        auth = world.wait_command(pid, "AUTHORIZE")  # and silence: nothing is answered
        world.wait_status(pid, "in doubt", lambda s: s["saga_state"] == "IN_DOUBT")
        [letter] = wait_for(lambda: world._read(t.dlq), 30, what="the review letter")
        h = {k: v.decode() for k, v in letter.headers}
        assert (h[H_RESUME_TOPIC], h[H_ERROR_CLASS]) == (t.saga_resume, "unknown")
        asked = [c["command_type"] for c in world.commands(pid)].count("INQUIRE")

        dry = redrive(settings, "--dry-run", "--kind", "saga")
        assert "would be: redriven 1" in dry.stdout, dry.stdout + dry.stderr
        run = redrive(settings, "--kind", "saga")
        assert run.returncode == 0 and "redriven 1, skipped (already done) 0" in run.stdout, (
            run.stdout + run.stderr)  # fmt: skip
        worker.kill()  # the resume is on its topic, read or not: a crash now loses nothing
        worker.start()
        inquiry = world.wait_command(pid, "INQUIRE", n=asked + 1)
        assert inquiry["idempotency_key"] == auth["idempotency_key"]
        world.answer(auth, "AUTHORIZED")  # the gateway had acted: it replays its outcome
        world.answer(world.wait_command(pid, "CAPTURE"), "CAPTURED")
        world.wait_status(
            pid, "completed", lambda s: s["terminal"] and s["saga_state"] == "COMPLETED"
        )

        again = redrive(settings, "--kind", "saga")
        assert "redriven 0, skipped (already done) 1" in again.stdout, again.stdout
        # An operator deletes the ledger entry (a tombstone) and redrives once more: the
        # same resume is delivered a second time, and the saga applies it once.
        produce(settings, t.dlq_redrives, [(f"{letter.partition}:{letter.offset}".encode(),
                                            None, [], 0)])  # fmt: skip
        third = redrive(settings, "--kind", "saga")
        assert "redriven 1, skipped (already done) 0" in third.stdout, third.stdout
        world.wait_status(
            pid,
            "the second resume's replay status",
            lambda s: s["replay"] and "not in doubt any more" in (s["reason"] or ""),
        )
        copies = [r for r in world._read(t.saga_resume)]
        assert len(copies) == 2 and len({dict(r.headers)[H_REDRIVE_ID] for r in copies}) == 1
        commands = world.commands(pid)
        sent = [c["command_type"] for c in commands]
        assert (sent.count("AUTHORIZE"), sent.count("CAPTURE")) == (1, 1)
        assert len({c["command_id"] for c in commands}) == len(commands)  # none sent twice
        # inquiries after the resume: one, and another only if it went unanswered past its
        # deadline while the worker restarted; none about the AUTHORIZE once it was answered
        assert sent.count("INQUIRE") >= asked + 1
        [capture] = [c for c in commands if c["command_type"] == "CAPTURE"]
        assert all(c["_offset"] < capture["_offset"] for c in commands
                   if c["idempotency_key"] == auth["idempotency_key"])  # fmt: skip
        resumed = [s for s in world.statuses(pid)
                   if "resumed by an operator" in (s["reason"] or "")]  # fmt: skip
        assert len(resumed) == 1
        ends = [s["saga_state"] for s in world.statuses(pid) if s["terminal"]]
        assert ends == ["IN_DOUBT", "COMPLETED"]
        never_early(world, pid)


def test_the_real_one_second_level(broker, tmp_path: Path) -> None:
    """The default CONTROL strategy's first level, 1 s, measured from the records."""
    with own_worker(broker, tmp_path, "onesec",
                    retry_variants="CONTROL:1:1000,5000,30000,300000") as (world, _):  # fmt: skip
        settings = world.settings
        assert RetryPolicy.parse(settings.retry_attempts, settings.retry_variants).levels == 4
        p = world.initiate(request())
        pid = p["payment_id"]
        world.answer(world.wait_command(pid, "AUTHORIZE"), "FAILED", code="gateway_unavailable",
                     retryable=True, reason="503")  # fmt: skip
        second = world.wait_command(pid, "AUTHORIZE", n=2)
        [r] = world.retries(pid)
        assert (r["level"], r["delay_ms"], r["variant"]) == (1, 1000, "CONTROL")
        assert second["_timestamp"] >= r["due_at"]
        # scheduled when the failure was processed: the send came a second or more later
        failure_seen = r["due_at"] - 1000
        assert second["_timestamp"] - failure_seen >= 1000
