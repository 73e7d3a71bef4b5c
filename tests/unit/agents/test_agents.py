"""Intake and saga agents on the test driver: the real payment topology, real RocksDB and
the real Avro codec, no broker. The same scenarios also run end to end through a broker
(tests/e2e/agents/test_e2e_intake.py and test_e2e_saga.py); these are the fast ones."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from paysaga.agents.saga import AUTH_EXPIRY, BREAKER_TICK, COMMAND_DEADLINE
from paysaga.domain.idempotency import scope_key
from paysaga.streams.app.settings import DAY_MS, Settings
from paysaga.streams.app.topology import paysaga_topology
from paysaga.streams.engine.deadletter import H_KIND
from paysaga.streams.engine.driver import TopologyTestDriver
from paysaga.streams.engine.partitioner import partition_for
from paysaga.tables.breaker import BREAKER
from paysaga.tables.payments import PAYMENTS
from tests.saga_support import CODEC, DriverWorld, new_id
from tests.samples import initiated

T0 = 1_790_000_000_000


@pytest.fixture
def world(tmp_path: Path) -> Iterator[DriverWorld]:
    settings = Settings(partitions=3, command_timeout_ms=10_000, data_dir=tmp_path)
    topology = paysaga_topology(settings)
    names = settings.topic_prefix
    driver = TopologyTestDriver(topology, tmp_path / "state", partitions=3,
                                dlq_topic=names + "payment.dlq", wall_ms=T0)  # fmt: skip
    yield DriverWorld(settings, driver)
    # Every payment the saga keeps parsed still matches the bytes it stored with it: no
    # agent code changed a payment after storing it (tables/payments.py, PaymentCache).
    process = next(a for a in topology.agents if a.name == "paysaga.saga").process
    saga = process.__self__  # type: ignore[attr-defined]  # a bound SagaAgent.process
    for raw, payment in saga.payments._held.values():
        assert payment.to_json() == raw
    driver.close()


_seq = iter(range(10_000, 10**9))


def request(**overrides: Any) -> dict[str, Any]:
    defaults = {"saga": "PAYMENT", "items": [], "capture_mode": "AUTOMATIC", "occurred_at": T0}
    return initiated(1, seed=next(_seq), **{**defaults, **overrides})[0]


def test_a_new_payment_starts_its_saga_and_a_replay_changes_nothing(world: DriverWorld) -> None:
    p = world.initiate(request())
    pid = p["payment_id"]
    auth = world.wait_command(pid, "AUTHORIZE")
    assert (auth["amount_minor"], auth["attempt"]) == (p["amount_minor"], 1)
    first = world.statuses(pid)
    assert [s["status"] for s in first] == ["INITIATED"]
    world.initiate({**p, "event_id": new_id()})  # a client retry: same key, same request
    again = world.statuses(pid)
    assert [s["replay"] for s in again] == [False, True]
    assert len([c for c in world.commands(pid) if c["command_type"] == "AUTHORIZE"]) == 1


def test_outputs_carry_the_inputs_event_time(world: DriverWorld) -> None:
    p = world.initiate(request(occurred_at=T0 - 3_600_000))
    statuses = world.driver.outputs("payment.status")
    commands = world.driver.outputs("payment.commands")
    assert {o.timestamp for o in statuses + commands} == {p["occurred_at"]}


def test_a_conflicting_request_under_a_used_key_is_refused(world: DriverWorld) -> None:
    p = world.initiate(request())
    other = {**p, "event_id": new_id(), "amount_minor": p["amount_minor"] + 1}
    world.initiate(other)
    assert world.statuses(pid := p["payment_id"])[-1]["status"] == "IDEMPOTENCY_CONFLICT"
    assert len(world.commands(pid)) == 1


def test_bad_avro_goes_to_the_dlq_and_intake_goes_on(world: DriverWorld) -> None:
    out = world.driver.pipe("payment.initiated", b"\x13\x37 not avro", b"junk", timestamp=T0)
    assert [(o.topic, dict(o.headers)[H_KIND]) for o in out] == [("payment.dlq", b"decode")]
    world.initiate(p := request())
    assert world.commands(p["payment_id"])


def test_a_record_off_its_partition_takes_one_hop_and_is_applied_once(world: DriverWorld) -> None:
    p = request()
    home = partition_for(scope_key(p["merchant_id"], p["idempotency_key"]).encode(), 3)
    world.send(world.t.initiated, "PaymentInitiated", p, partition=(home + 1) % 3)
    hops = world.driver.outputs("paysaga.payment.initiated.repartition")
    assert [o.partition for o in hops] == [home]
    assert len(world.commands(p["payment_id"])) == 1


def test_inventory_refused_ends_canceled_before_any_money_moved(world: DriverWorld) -> None:
    p = world.initiate(request(saga="ORDER", items=[{"sku": "A", "quantity": 1}]))
    pid = p["payment_id"]
    world.answer(world.wait_command(pid, "RESERVE"), "RESERVATION_FAILED", reason="no stock")
    final = world.terminal(pid)
    assert (final["status"], final["saga_state"], final["terminal"]) == ("CANCELED", "FAILED", True)
    assert "AUTHORIZE" not in [c["command_type"] for c in world.commands(pid)]


def test_a_duplicate_answer_is_applied_once(world: DriverWorld) -> None:
    p = world.initiate(request())
    pid = p["payment_id"]
    auth = world.wait_command(pid, "AUTHORIZE")
    answer = world.answer(auth, "AUTHORIZED")
    world.answer(auth, "AUTHORIZED", event_id=answer["event_id"])  # redelivered
    assert [c["command_type"] for c in world.commands(pid)] == ["AUTHORIZE", "CAPTURE"]


def test_an_unanswered_command_is_inquired_about_then_retried_with_the_same_key(
    world: DriverWorld,
) -> None:
    p = world.initiate(request())
    pid = p["payment_id"]
    first = world.wait_command(pid, "AUTHORIZE")
    world.driver.advance_wall_clock(9_000)
    assert len(world.commands(pid)) == 1  # not due yet
    world.driver.advance_wall_clock(2_000)
    inquiry = world.wait_command(pid, "INQUIRE")
    assert inquiry["idempotency_key"] == first["idempotency_key"] and inquiry["attempt"] == 1
    world.answer(inquiry, "FAILED", code="never_seen", reason="never seen", retryable=True)
    [retry] = world.retries(pid)
    assert (retry["action"], retry["attempt"], retry["level"]) == ("AUTHORIZE", 2, 1)
    assert (
        retry["error_class"] == "transient" and retry["idempotency_key"] == first["idempotency_key"]
    )
    delay = retry["delay_ms"]
    assert retry["variant"] in ("CONTROL", "TEST_A", "TEST_B") and delay in (500, 1000, 2000)
    world.driver.advance_wall_clock(delay - 1)
    assert [c["command_type"] for c in world.commands(pid)] == ["AUTHORIZE", "INQUIRE"]
    world.driver.advance_wall_clock(1)
    second = world.wait_command(pid, "AUTHORIZE", n=2)
    assert second["idempotency_key"] == first["idempotency_key"]
    assert (second["attempt"], second["command_id"] != first["command_id"]) == (2, True)
    assert second["command_id"] == retry["command_id"]


def test_a_step_answered_late_keeps_its_deadline_and_is_never_resent_early(
    world: DriverWorld,
) -> None:
    """The command-deadline timer only moves earlier: CAPTURE, sent 8 s after AUTHORIZE,
    inherits AUTHORIZE's timer; that timer fires at 10 s, finds nothing overdue and is armed
    again at CAPTURE's own deadline, 18 s."""
    p = world.initiate(request())
    pid, key = p["payment_id"], p["payment_id"].encode()
    part = partition_for(key, 3)

    def timer_keys() -> set[bytes]:
        return {k for k in world.driver.table(PAYMENTS, part) if k.startswith(b"\x01")}

    armed = timer_keys()
    assert armed  # AUTHORIZE's deadline
    world.driver.advance_wall_clock(8_000)
    world.answer(world.wait_command(pid, "AUTHORIZE"), "AUTHORIZED")
    assert timer_keys() == armed  # not moved: no timer writes for this step
    world.driver.advance_wall_clock(2_500)  # AUTHORIZE's deadline passed, CAPTURE's not
    assert [c["command_type"] for c in world.commands(pid)] == ["AUTHORIZE", "CAPTURE"]
    assert timer_keys() != armed  # armed again, at CAPTURE's deadline
    world.driver.advance_wall_clock(7_000)  # 17.5 s: still not due
    assert len(world.commands(pid)) == 2
    world.driver.advance_wall_clock(1_000)
    inquiry = world.wait_command(pid, "INQUIRE")  # overdue: what became of the CAPTURE?
    assert inquiry["attempt"] == 1
    world.answer(world.wait_command(pid, "CAPTURE"), "CAPTURED")  # the recorded outcome
    # The SETTLE goes to the merchant's batch, not to the gateway: its answer is awaited
    # from the batch's submission on, so the one timer left is armed a day out.
    assert "SETTLE" not in [c["command_type"] for c in world.commands(pid)]
    assert len(world.driver.outputs(world.t.settlement_requests)) == 1
    stored = json.loads(world.driver.table(PAYMENTS, part)[key])
    [settle] = stored["outstanding"].values()
    assert settle["deadline"] > world.driver.clock.now_ms + 3_600_000
    assert timer_keys()  # still armed: the SETTLE awaits its answer


def test_an_uncaptured_authorization_expires_by_stream_time(world: DriverWorld) -> None:
    p = world.initiate(request(capture_mode="MANUAL"))
    pid = p["payment_id"]
    world.answer(world.wait_command(pid, "AUTHORIZE"), "AUTHORIZED")
    key = pid.encode()
    part = partition_for(key, 3)
    stored = json.loads(world.driver.table(PAYMENTS, part)[key])
    assert stored["timer_event"] is not None
    assert "VOID" not in [c["command_type"] for c in world.commands(pid)]
    later = next(r for r in (request(occurred_at=T0 + 8 * DAY_MS) for _ in range(300))
                 if partition_for(r["payment_id"].encode(), 3) == part)  # fmt: skip
    world.initiate(later)  # event time on the partition passes the 7-day window
    void = world.wait_command(pid, "VOID")
    assert void["amount_minor"] == p["amount_minor"]


def test_idempotency_keys_are_purged_by_event_time(world: DriverWorld) -> None:
    p = world.initiate(request())
    scope = scope_key(p["merchant_id"], p["idempotency_key"]).encode()
    home = partition_for(scope, 3)
    assert scope in world.driver.table("idempotency", home)
    later = next(r for r in (request(occurred_at=T0 + DAY_MS + 1) for _ in range(300))
                 if partition_for(scope_key(r["merchant_id"], r["idempotency_key"]).encode(), 3)
                 == home)  # fmt: skip
    world.initiate(later)
    assert scope not in world.driver.table("idempotency", home)
    reuse = {**p, "event_id": new_id(), "payment_id": p["payment_id"] + "-again",
             "occurred_at": later["occurred_at"] + 1}  # fmt: skip
    world.initiate(reuse)
    assert [s["status"] for s in world.statuses(reuse["payment_id"])] == ["INITIATED"]


def test_the_timers_are_declared_on_the_payments_table() -> None:
    topology = paysaga_topology(Settings())
    saga = next(a for a in topology.agents if a.name == "paysaga.saga")
    assert {t.name: t.table for t in saga.timers} == {COMMAND_DEADLINE: PAYMENTS,
                                                      AUTH_EXPIRY: PAYMENTS,
                                                      BREAKER_TICK: BREAKER}  # fmt: skip
    assert (
        CODEC.decode(
            CODEC.encode("PaymentStatusChanged", {**world_status_sample()}), "PaymentStatusChanged"
        )["status"]
        == "CANCELED"
    )


def world_status_sample() -> dict[str, Any]:
    return {"event_id": new_id(), "occurred_at": T0, "payment_id": "p", "correlation_id": "o",
            "causation_id": None, "merchant_id": "m", "idempotency_key": "k",
            "status": "CANCELED", "previous_status": "INITIATED", "amount_minor": 100,
            "currency": "EUR", "replay": False, "reason": None}  # fmt: skip
