"""The settlement agent on the test driver: real RocksDB and Avro codec, no broker.

Stream time moves only with the inputs' event times, so batches are submitted while the
driver's wall clock stands still."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from paysaga.agents.settlement import SettlementAgent
from paysaga.domain.payment import derived_id
from paysaga.domain.saga import command_id
from paysaga.domain.settlement import DAY_MS, HOUR_MS, SettlementPolicy, batch_id
from paysaga.schemas.codec import AvroCodec
from paysaga.schemas.registry import SchemaRegistry
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import Topics
from paysaga.streams.app.topology import paysaga_topology
from paysaga.streams.engine import Topology
from paysaga.streams.engine.deadletter import H_KIND
from paysaga.streams.engine.driver import TopologyTestDriver
from paysaga.streams.engine.partitioner import partition_for
from paysaga.tables.payments import PAYMENTS
from paysaga.tables.settlement import SETTLEMENT
from tests.saga_support import DriverWorld
from tests.samples import initiated

CODEC = AvroCodec(SchemaRegistry())
T0 = 1_790_006_400_000 - 1_790_006_400_000 % DAY_MS  # a UTC midnight
NAMES = Topics("")
POLICY = SettlementPolicy(batch_ms=DAY_MS, cutoff_ms=HOUR_MS, retention_ms=2 * DAY_MS)


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[TopologyTestDriver]:
    topology = Topology(serializer=CODEC.encode)
    SettlementAgent(CODEC, NAMES, POLICY).add_to(topology)
    d = TopologyTestDriver(topology, tmp_path, partitions=3, dlq_topic=NAMES.dlq, wall_ms=T0)
    yield d
    d.close()


def settle(d: TopologyTestDriver, n: int, amount: int = 1000, at: int = T0 + HOUR_MS,
           merchant: str = "m1", currency: str = "EUR",
           **extra: Any) -> dict[str, Any]:  # fmt: skip
    key = f"pay-{n}:settle:post"
    cmd = {"event_id": command_id(key, 1), "occurred_at": at, "payment_id": f"pay-{n}",
           "correlation_id": f"ord-{n}", "causation_id": None, "command_id": command_id(key, 1),
           "idempotency_key": key, "command_type": "SETTLE", "amount_minor": amount,
           "currency": currency, "merchant_id": merchant, "card_token": f"tok_{n}",
           "attempt": 1, **extra}  # fmt: skip
    d.pipe(NAMES.settlement_requests, CODEC.encode("PaymentCommand", cmd),
           key=merchant.encode(), timestamp=at)  # fmt: skip
    return cmd


def batches(d: TopologyTestDriver) -> list[dict[str, Any]]:
    return [CODEC.decode(o.value, "SettlementBatch")
            for o in d.outputs(NAMES.settlement_batches) if o.value]  # fmt: skip


def settles(d: TopologyTestDriver) -> list[dict[str, Any]]:
    return [CODEC.decode(o.value, "PaymentCommand")
            for o in d.outputs(NAMES.commands) if o.value]  # fmt: skip


def submit_day(d: TopologyTestDriver, day: int = 0, merchant: str = "m1") -> None:
    """Move the merchant's partition's stream time past day `day`'s cut-off."""
    settle(d, 9000 + day, amount=1, at=T0 + (day + 1) * DAY_MS + HOUR_MS, merchant=merchant)


def test_a_batch_is_submitted_at_its_cutoff_with_its_members_and_their_settles(
    driver: TopologyTestDriver,
) -> None:
    sent = [settle(driver, n, amount=1000 + n, at=T0 + n * HOUR_MS) for n in range(5)]
    settle(driver, 5, amount=700, currency="USD")
    settle(driver, 6, amount=50, at=T0 + DAY_MS + HOUR_MS - 1)  # stream time just before
    assert batches(driver) == [] and settles(driver) == []
    submit_day(driver)
    eur, usd = sorted((b for b in batches(driver) if b["batch_start"] == T0),
                      key=lambda b: b["currency"])  # fmt: skip
    assert (eur["member_count"], eur["total_minor"]) == (5, sum(1000 + n for n in range(5)))
    assert eur["total_minor"] == sum(m["amount_minor"] for m in eur["members"])
    assert [m["payment_id"] for m in eur["members"]] == [f"pay-{n}" for n in range(5)]
    assert eur["batch_id"] == batch_id("m1", "EUR", T0)
    assert (eur["batch_end"], eur["submitted_at"]) == (T0 + DAY_MS, T0 + DAY_MS + HOUR_MS)
    assert eur["lag_max_ms"] == DAY_MS + HOUR_MS  # pay-0, ready at midnight
    assert (usd["member_count"], usd["total_minor"]) == (1, 700)
    # Each member's SETTLE goes to the gateway as the saga wrote it: the same command id.
    assert sorted(c["command_id"] for c in settles(driver)) == sorted(
        [c["command_id"] for c in sent] + [command_id("pay-5:settle:post", 1)]
    )
    assert all(c["command_type"] == "SETTLE" for c in settles(driver))
    # The request just before the cut-off is in the next day's batch, not yet submitted.
    assert "pay-6" not in {c["payment_id"] for c in settles(driver)}


def test_a_request_seen_twice_settles_once_and_a_late_one_goes_to_the_open_batch(
    driver: TopologyTestDriver,
) -> None:
    settle(driver, 1)
    settle(driver, 1)  # the same request again
    submit_day(driver)  # stream time now T0 + 1 day + 1 h: day 0 is submitted
    settle(driver, 2, at=T0 + 2 * HOUR_MS)  # ready on day 0, but day 0 was submitted
    [day0] = [b for b in batches(driver) if b["batch_start"] == T0]
    assert day0["member_count"] == 1 and day0["members"][0]["payment_id"] == "pay-1"
    submit_day(driver, 1)
    [day1] = [b for b in batches(driver) if b["batch_start"] == T0 + DAY_MS]
    assert {m["payment_id"] for m in day1["members"]} == {"pay-2", "pay-9000"}
    ids = [c["payment_id"] for c in settles(driver)]
    assert ids.count("pay-1") == 1 and ids.count("pay-2") == 1


def test_lag_is_kept_per_merchant_and_submitted_batches_are_purged_after_retention(
    driver: TopologyTestDriver,
) -> None:
    settle(driver, 1, at=T0 + 23 * HOUR_MS)  # waits 2 h
    settle(driver, 2, at=T0 + 22 * HOUR_MS)  # waits 3 h
    submit_day(driver)
    part = partition_for(b"m1", 3)
    table = driver.table(SETTLEMENT, part)
    lag = json.loads(table[b"G\x00m1"])
    assert lag == {"count": 2, "total_ms": 5 * HOUR_MS, "max_ms": 3 * HOUR_MS}
    assert any(k.startswith(b"M\x00m1\x00EUR\x00") for k in table)
    settle(driver, 3, at=T0 + 4 * DAY_MS)  # past day 0's submission + retention
    table = driver.table(SETTLEMENT, part)
    day0 = str(T0).zfill(15).encode()
    assert not any(day0 in k for k in table if k[:1] in (b"B", b"M"))
    assert b"I\x00m1\x00pay-1" not in table
    assert b"G\x00m1" in table  # the lag outlives the batch


def test_a_request_that_is_not_a_settle_goes_to_the_dlq(driver: TopologyTestDriver) -> None:
    settle(driver, 1, command_type="CAPTURE")
    driver.pipe(NAMES.settlement_requests, b"\x00garbage", key=b"m1")
    settle(driver, 2)
    letters = driver.outputs(NAMES.dlq)
    assert [dict(o.headers)[H_KIND] for o in letters] == [b"validation", b"decode"]
    submit_day(driver)
    [b] = [b for b in batches(driver) if b["batch_start"] == T0]
    assert [m["payment_id"] for m in b["members"]] == ["pay-2"]


def test_the_saga_settles_its_payment_through_the_batch(tmp_path: Path) -> None:
    """The whole topology: the saga hands its SETTLE to the batch; once submitted, the
    gateway's answer to that same command settles the payment."""
    settings = Settings(partitions=3, data_dir=tmp_path, settlement_batch_ms=DAY_MS,
                        settlement_cutoff_ms=HOUR_MS)  # fmt: skip
    driver = TopologyTestDriver(paysaga_topology(settings), tmp_path, partitions=3,
                                dlq_topic=NAMES.dlq, wall_ms=T0 + HOUR_MS)  # fmt: skip
    try:
        world = DriverWorld(settings, driver)
        [p] = initiated(1, seed=11, saga="PAYMENT", items=[], capture_mode="AUTOMATIC",
                        occurred_at=T0 + HOUR_MS)  # fmt: skip
        p = world.initiate(p)
        pid = p["payment_id"]
        world.answer(world.wait_command(pid, "AUTHORIZE"), "AUTHORIZED")
        world.answer(world.wait_command(pid, "CAPTURE"), "CAPTURED")
        assert "SETTLE" not in [c["command_type"] for c in world.commands(pid)]
        submit_day(driver, merchant=p["merchant_id"])
        cmd = world.wait_command(pid, "SETTLE")
        assert cmd["command_id"] == command_id(f"{pid}:settle:post", 1)
        world.answer(cmd, "SETTLED")
        world.wait_status(pid, "SETTLED", lambda s: s["status"] == "SETTLED")
        stored = json.loads(driver.table(PAYMENTS)[pid.encode()])
        assert stored["status"] == "SETTLED" and stored["outstanding"] == {}
        [b] = [b for b in batches(driver) if b["batch_start"] == T0]
        assert b["members"] == [{"payment_id": pid, "amount_minor": p["amount_minor"],
                                 "ready_at": cmd["occurred_at"]}]  # fmt: skip
        assert b["batch_id"] == derived_id("settlement", p["merchant_id"], p["currency"], str(T0))
    finally:
        driver.close()
