"""The saga core end to end through the broker: one worker, the test plays the services.

Every path a payment team relies on: both sagas' happy paths, every compensation path,
idempotent replays and conflicts, manual and partial capture, refunds, out-of-order and
duplicate events, authorization expiry and command timeouts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from paysaga.streams.app.settings import DAY_MS, Settings
from paysaga.streams.app.topics import create_topics
from paysaga.streams.engine.partitioner import partition_for
from tests.saga_support import World, new_id
from tests.samples import initiated
from tests.support import WorkerProcess, isolated_settings, paysaga, wait_for

ITEMS = [{"sku": "sku_1", "quantity": 2}]
_seq = iter(range(1000, 100_000))


@pytest.fixture(scope="module")
def world(broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp: Path = tmp_path_factory.mktemp("saga")
    settings = isolated_settings(broker.bootstrap, tmp / "state", "saga",
                                 command_timeout_ms=120_000)  # fmt: skip
    asyncio.run(create_topics(settings))
    worker = WorkerProcess(settings, tmp / "worker.log").start()
    yield World(settings)
    worker.kill()


def request(**overrides) -> dict:
    """A fresh PaymentInitiated (unique ids per call)."""
    n = next(_seq)
    defaults = {"saga": "PAYMENT", "items": [], "capture_mode": "AUTOMATIC"}
    return initiated(1, seed=n, **{**defaults, **overrides})[0]


def actions(world: World, pid: str) -> list[str]:
    return [c["command_type"] for c in world.commands(pid)]


def terminal_once(world: World, pid: str) -> dict:
    final = world.terminal(pid)
    assert sum(s["terminal"] for s in world.statuses(pid)) == 1
    return final


def test_payment_saga_happy_path(world: World) -> None:
    p = world.initiate(request())
    pid = p["payment_id"]
    auth = world.wait_command(pid, "AUTHORIZE")
    assert auth["amount_minor"] == p["amount_minor"] and auth["attempt"] == 1
    assert auth["idempotency_key"] == f"{pid}:authorize:action"
    world.answer(auth, "AUTHORIZED")
    cap = world.wait_command(pid, "CAPTURE")
    world.answer(cap, "CAPTURED")
    final = terminal_once(world, pid)
    assert final["saga_state"] == "COMPLETED" and final["status"] == "CAPTURED"
    settle = world.wait_command(pid, "SETTLE")
    world.answer(settle, "SETTLED")
    world.wait_status(pid, "SETTLED", lambda s: s["status"] == "SETTLED")
    assert actions(world, pid) == ["AUTHORIZE", "CAPTURE", "SETTLE"]
    ids = [c["command_id"] for c in world.commands(pid)]
    assert len(ids) == len(set(ids))


def test_order_saga_happy_path(world: World) -> None:
    p = world.initiate(request(saga="ORDER", items=ITEMS))
    pid = p["payment_id"]
    reserve = world.wait_command(pid, "RESERVE")
    assert reserve["items"] == ITEMS
    world.answer(reserve, "RESERVED")
    world.answer(world.wait_command(pid, "AUTHORIZE"), "AUTHORIZED")
    world.answer(world.wait_command(pid, "CAPTURE"), "CAPTURED")
    ship = world.wait_command(pid, "CREATE_SHIPMENT")
    assert ship["address_country"] == p["shipping_country"]
    world.answer(ship, "CREATED")
    final = terminal_once(world, pid)
    assert (final["saga"], final["saga_state"]) == ("ORDER", "COMPLETED")
    world.wait_command(pid, "SETTLE")  # with the merchant's settlement batch, seconds later
    assert actions(world, pid) == [
        "AUTHORIZE",
        "CAPTURE",
        "SETTLE",
        "RESERVE",
        "CREATE_SHIPMENT",
    ]  # fmt: skip  (grouped by topic)


def test_declined_authorization_fails_without_compensation(world: World) -> None:
    p = world.initiate(request())
    pid = p["payment_id"]
    world.answer(world.wait_command(pid, "AUTHORIZE"), "FAILED", reason="insufficient funds")
    final = terminal_once(world, pid)
    assert (final["status"], final["saga_state"]) == ("FAILED", "FAILED")
    assert "insufficient funds" in final["reason"]
    assert actions(world, pid) == ["AUTHORIZE"]


def test_retryable_failure_retries_with_the_same_idempotency_key(world: World) -> None:
    p = world.initiate(request())
    pid = p["payment_id"]
    first = world.wait_command(pid, "AUTHORIZE")
    world.answer(first, "FAILED", code="gateway_unavailable", retryable=True)
    second = world.wait_command(pid, "AUTHORIZE", n=2)
    assert second["attempt"] == 2 and second["command_id"] != first["command_id"]
    assert second["idempotency_key"] == first["idempotency_key"]
    world.answer(second, "AUTHORIZED")
    world.answer(world.wait_command(pid, "CAPTURE"), "CAPTURED")
    assert terminal_once(world, pid)["saga_state"] == "COMPLETED"


@pytest.mark.parametrize(
    ("fail_at", "failure", "compensations", "state"),
    [
        ("RESERVE", "RESERVATION_FAILED", [], "FAILED"),
        ("AUTHORIZE", "FAILED", ["RELEASE"], "COMPENSATED"),
        ("CAPTURE", "FAILED", ["VOID", "RELEASE"], "COMPENSATED"),
        ("CREATE_SHIPMENT", "CREATION_FAILED", ["REFUND", "RELEASE"], "COMPENSATED"),
    ],
)
def test_order_saga_compensates_in_reverse(
    world: World, fail_at: str, failure: str, compensations: list[str], state: str
) -> None:
    p = world.initiate(request(saga="ORDER", items=ITEMS))
    pid = p["payment_id"]
    answers = {"RESERVE": "RESERVED", "AUTHORIZE": "AUTHORIZED", "CAPTURE": "CAPTURED",
               "CREATE_SHIPMENT": "CREATED"}  # fmt: skip
    for action, ok in answers.items():
        cmd = world.wait_command(pid, action)
        if action == fail_at:
            world.answer(cmd, failure, reason=f"{action.lower()} refused")
            break
        world.answer(cmd, ok)
    done = {"VOID": "VOIDED", "REFUND": "REFUNDED", "RELEASE": "RELEASED"}
    seen = []
    for action in compensations:
        cmd = world.wait_command(pid, action)
        seen.append((cmd["occurred_at"], action))
        if action in ("VOID", "REFUND"):
            assert cmd["amount_minor"] == p["amount_minor"]
        world.answer(cmd, done[action])
    final = terminal_once(world, pid)
    assert final["saga_state"] == state
    assert f"{fail_at.lower()} refused" in final["reason"]
    issued = [a for a in actions(world, pid) if a in done]
    assert sorted(issued) == sorted(compensations)  # and nothing else (no VOID after capture)
    if len(compensations) == 2:  # reverse order: the second waited for the first's answer
        first, second = (world.wait_command(pid, a) for a in compensations)
        assert first["occurred_at"] <= second["occurred_at"]
    expected_status = {"RESERVE": "CANCELED", "AUTHORIZE": "FAILED", "CAPTURE": "REVERSED",
                       "CREATE_SHIPMENT": "REVERSED"}[fail_at]  # fmt: skip
    assert final["status"] == expected_status


def test_idempotent_replay_and_conflicts(world: World) -> None:
    p = world.initiate(request())
    pid = p["payment_id"]
    world.wait_command(pid, "AUTHORIZE")
    world.initiate({**p, "event_id": new_id(), "occurred_at": p["occurred_at"] + 5})  # retry
    replay = world.wait_status(pid, "replay", lambda s: s["replay"])
    assert replay["status"] == "INITIATED" and replay["idempotency_key"] == p["idempotency_key"]
    # Same key, another payment id: a conflict, never a second payment.
    other = {**p, "event_id": new_id(), "payment_id": f"{pid}-other"}
    world.initiate(other)
    clash = world.wait_status(other["payment_id"], "conflict",
                              lambda s: s["status"] == "IDEMPOTENCY_CONFLICT")  # fmt: skip
    assert pid in clash["reason"]
    # Same key, same payment id, other amount: a conflict too, the payment unchanged.
    world.initiate({**p, "event_id": new_id(), "amount_minor": p["amount_minor"] + 1})
    world.wait_status(pid, "conflict", lambda s: s["status"] == "IDEMPOTENCY_CONFLICT")
    # The same key under another merchant is another scope: a new payment.
    fresh = {**p, "event_id": new_id(), "payment_id": f"{pid}-m2", "merchant_id": "m_other"}
    world.initiate(fresh)
    world.wait_command(fresh["payment_id"], "AUTHORIZE")
    assert actions(world, pid) == ["AUTHORIZE"]
    assert world.commands(other["payment_id"]) == []
    statuses = world.statuses(other["payment_id"])
    assert [s["status"] for s in statuses] == ["IDEMPOTENCY_CONFLICT"]


def test_duplicates_in_one_batch_make_one_payment(world: World) -> None:
    p = request()
    copies = [{**p, "event_id": new_id()} for _ in range(5)]

    async def burst() -> None:
        from aiokafka import AIOKafkaProducer

        from tests.saga_support import CODEC

        producer = AIOKafkaProducer(bootstrap_servers=world.settings.bootstrap, linger_ms=50)
        await producer.start()
        try:
            for e in copies:  # one producer batch: the worker sees them in one fetch
                await producer.send(world.t.initiated, CODEC.encode("PaymentInitiated", e),
                                    key=p["payment_id"].encode(), partition=0)  # fmt: skip
            await producer.flush()
        finally:
            await producer.stop()

    asyncio.run(burst())
    pid = p["payment_id"]
    world.wait_command(pid, "AUTHORIZE")
    wait_for(lambda: sum(s["replay"] for s in world.statuses(pid)) == 4, 60, what="4 replays")
    assert actions(world, pid) == ["AUTHORIZE"]


def test_manual_partial_capture_and_refunds(world: World) -> None:
    p = world.initiate(request(capture_mode="MANUAL"))
    pid, amount = p["payment_id"], p["amount_minor"]
    world.answer(world.wait_command(pid, "AUTHORIZE"), "AUTHORIZED")
    world.wait_status(pid, "awaiting capture", lambda s: s["status"] == "AUTHORIZED")
    part = amount * 6 // 10
    world.request(p, "CAPTURE", "cap-1", part)
    cap = world.wait_command(pid, "CAPTURE")
    assert cap["amount_minor"] == part
    world.request(p, "CAPTURE", "cap-1", part)  # the same request again: a replay
    world.wait_status(pid, "capture replay", lambda s: s["replay"] and s["step"] == "capture")
    world.answer(cap, "CAPTURED")
    done = terminal_once(world, pid)
    assert done["captured_minor"] == part and done["authorized_minor"] == amount

    first = part // 3
    world.request(p, "REFUND", "r-1", first)
    r1 = world.wait_command(pid, "REFUND")
    assert (r1["amount_minor"], r1["idempotency_key"]) == (first, f"{pid}:refund:r-1")
    world.request(p, "REFUND", "r-1", first)  # replayed, not refunded twice
    world.request(p, "REFUND", "r-1", first + 1)  # same key, other amount: conflict
    world.wait_status(pid, "refund conflict", lambda s: s["status"] == "IDEMPOTENCY_CONFLICT")
    world.request(p, "REFUND", "r-2", part)  # more than is left: rejected
    world.wait_status(pid, "rejected refund", lambda s: s["status"] == "REJECTED")
    world.answer(r1, "REFUNDED")
    world.wait_status(pid, "partial refund", lambda s: s["refunded_minor"] == first)
    world.request(p, "REFUND", "r-3")  # the rest
    r3 = world.wait_command(pid, "REFUND", n=2)
    assert r3["amount_minor"] == part - first
    world.answer(r3, "REFUNDED")
    final = world.wait_status(pid, "fully refunded", lambda s: s["status"] == "REVERSED")
    assert final["refunded_minor"] == part
    assert [c["idempotency_key"] for c in world.commands(pid) if c["command_type"] == "REFUND"] == [
        f"{pid}:refund:r-1", f"{pid}:refund:r-3"]  # fmt: skip
    assert sum(s["terminal"] for s in world.statuses(pid)) == 1
    reasons = [h for _, h in world.dead_letters() if "exceeds" in h["paysaga.error.reason"]]
    assert reasons, "the refused refund went to the DLQ for investigation"


def test_duplicate_and_out_of_order_events(world: World) -> None:
    p = world.initiate(request())
    pid = p["payment_id"]
    auth = world.wait_command(pid, "AUTHORIZE")
    # A capture answer before any capture was asked for: refused, never applied.
    world.answer({**auth, "command_type": "CAPTURE"}, "CAPTURED")
    rejected = world.wait_status(pid, "rejection", lambda s: s["status"] == "REJECTED")
    assert rejected["captured_minor"] == 0 and "CAPTURED does not answer AUTHORIZE" in (
        rejected["reason"])  # fmt: skip
    # An answer to a command that was never sent.
    world.answer({**auth, "command_id": "cmd-never-sent"}, "AUTHORIZED")
    world.wait_status(pid, "unmatched", lambda s: "no outstanding command" in (s["reason"] or ""))
    # The real answer, delivered twice: applied once.
    eid = new_id()
    world.answer(auth, "AUTHORIZED", event_id=eid)
    world.answer(auth, "AUTHORIZED", event_id=eid)
    cap = world.wait_command(pid, "CAPTURE")
    world.answer(cap, "CAPTURED")
    final = terminal_once(world, pid)
    assert final["captured_minor"] == p["amount_minor"]
    assert actions(world, pid).count("CAPTURE") == 1
    letters = [h for k, h in world.dead_letters() if k == pid.encode()]
    assert len(letters) == 2 and {h["paysaga.error.kind"] for h in letters} == {"transition"}


def _days_ago(days: int) -> int:
    """Event times in the past: a broker refuses timestamps over an hour ahead of its clock."""
    return int(time.time() * 1000) - days * DAY_MS


def test_uncaptured_authorization_expires_by_event_time(world: World) -> None:
    p = world.initiate(request(capture_mode="MANUAL", occurred_at=_days_ago(9)))
    pid = p["payment_id"]
    world.answer(world.wait_command(pid, "AUTHORIZE"), "AUTHORIZED")
    world.wait_status(pid, "authorized", lambda s: s["status"] == "AUTHORIZED")
    # Event time moves on this partition: another payment 8 days later on the same partition.
    n = world.settings.partitions
    later = next(r for r in (request(occurred_at=p["occurred_at"] + 8 * DAY_MS)
                             for _ in range(200))
                 if partition_for(r["payment_id"].encode(), n)
                 == partition_for(pid.encode(), n))  # fmt: skip
    world.initiate(later)
    void = world.wait_command(pid, "VOID")
    assert void["amount_minor"] == p["amount_minor"]
    world.answer(void, "VOIDED")
    final = terminal_once(world, pid)
    assert (final["status"], final["saga_state"]) == ("REVERSED", "COMPENSATED")
    assert "window" in final["reason"]
    assert "CAPTURE" not in actions(world, pid)


def test_cancel_request_voids_an_awaiting_authorization(world: World) -> None:
    p = world.initiate(request(capture_mode="MANUAL"))
    pid = p["payment_id"]
    auth = world.wait_command(pid, "AUTHORIZE")
    world.request(p, "CANCEL", "c-early")  # authorization still pending: rejected
    world.wait_status(pid, "early cancel rejected", lambda s: s["status"] == "REJECTED")
    world.answer(auth, "AUTHORIZED")
    world.wait_status(pid, "authorized", lambda s: s["status"] == "AUTHORIZED")
    world.request(p, "CANCEL", "c-1")
    world.answer(world.wait_command(pid, "VOID"), "VOIDED")
    assert terminal_once(world, pid)["saga_state"] == "COMPENSATED"


def test_unanswered_command_is_retried_after_its_timeout(broker, tmp_path: Path) -> None:
    settings: Settings = isolated_settings(broker.bootstrap, tmp_path / "state", "timeout",
                                           command_timeout_ms=1000, punctuate_ms=100)  # fmt: skip
    asyncio.run(create_topics(settings))
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        world = World(settings)
        p = world.initiate(request())
        pid = p["payment_id"]
        first = world.wait_command(pid, "AUTHORIZE")
        # No answer: the gateway may have acted, so it is asked about the key first
        # (docs/retries.md); only a key it never saw is sent again, with the same key.
        inquiry = world.wait_command(pid, "INQUIRE", timeout=30)
        assert inquiry["idempotency_key"] == first["idempotency_key"]
        world.answer(inquiry, "FAILED", code="never_seen", reason="never seen", retryable=True)
        second = world.wait_command(pid, "AUTHORIZE", n=2, timeout=30)
        assert second["idempotency_key"] == first["idempotency_key"]
        assert second["attempt"] == 2 and second["command_id"] != first["command_id"]
        world.answer(first, "AUTHORIZED")  # the late answer to the first attempt counts
        world.answer(world.wait_command(pid, "CAPTURE"), "CAPTURED")
        assert terminal_once(world, pid)["saga_state"] == "COMPLETED"
    finally:
        worker.kill()


def test_idempotency_keys_expire_by_event_time_and_are_purged(world: World) -> None:
    from paysaga.domain.idempotency import scope_key

    n = world.settings.partitions
    p = world.initiate(request(occurred_at=_days_ago(2)))
    world.wait_command(p["payment_id"], "AUTHORIZE")
    home = partition_for(scope_key(p["merchant_id"], p["idempotency_key"]).encode(), n)
    # Another request whose key lives on the same partition, a day and a minute later:
    # the partition's event time passes the first key's expiry, and the timer purges it.
    later = next(r for r in (request(occurred_at=p["occurred_at"] + DAY_MS + 60_000)
                             for _ in range(300))
                 if partition_for(scope_key(r["merchant_id"], r["idempotency_key"]).encode(), n)
                 == home)  # fmt: skip
    world.initiate(later)
    world.wait_command(later["payment_id"], "AUTHORIZE")
    # The expired key is free again: a different request under it is new, not a conflict.
    reuse = {**p, "event_id": new_id(), "payment_id": p["payment_id"] + "-reuse",
             "occurred_at": later["occurred_at"] + 1}  # fmt: skip
    world.initiate(reuse)
    world.wait_command(reuse["payment_id"], "AUTHORIZE")
    assert not [s for s in world.statuses(reuse["payment_id"])
                if s["status"] == "IDEMPOTENCY_CONFLICT"]  # fmt: skip


def test_the_history_of_a_compensated_order_lists_every_step_in_order(world: World) -> None:
    """`paysaga payment history` (GET /payments/{id}/events): the audit trail rebuilt from
    the topics, every input, command and status of a saga that compensated, in order."""
    p = world.initiate(request(saga="ORDER", items=ITEMS))
    pid = p["payment_id"]
    for action, answer in (("RESERVE", "RESERVED"), ("AUTHORIZE", "AUTHORIZED"),
                           ("CAPTURE", "CAPTURED"), ("CREATE_SHIPMENT", "CREATION_FAILED"),
                           ("REFUND", "REFUNDED"), ("RELEASE", "RELEASED")):  # fmt: skip
        world.answer(world.wait_command(pid, action), answer, reason="refused")
    terminal_once(world, pid)
    shown = paysaga(world.settings, "payment", "history", pid)
    assert shown.returncode == 0, shown.stderr
    rows = [line.split()[1:3] for line in shown.stdout.splitlines()[1:]]
    inputs = [k for role, k in rows if role == "input"]
    commands = [k for role, k in rows if role == "command"]
    assert inputs == ["ACCEPTED", "RESERVED", "AUTHORIZED", "CAPTURED", "CREATION_FAILED",
                      "REFUNDED", "RELEASED"]  # fmt: skip
    assert commands == ["RESERVE", "AUTHORIZE", "CAPTURE", "CREATE_SHIPMENT", "REFUND", "RELEASE"]
    # Each input comes before what it caused, and the saga's end is the last status.
    assert rows.index(["input", "CAPTURED"]) < rows.index(["command", "CREATE_SHIPMENT"])
    assert rows.index(["command", "REFUND"]) < rows.index(["input", "REFUNDED"])
    assert "(end)" in [line for line in shown.stdout.splitlines() if " status " in line][-1]
    assert all(line[:4].isdigit() and "Z " in line for line in shown.stdout.splitlines()[1:])
