"""The outside-service simulators through the real broker: commands in, committed answers out."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections import Counter
from contextlib import asynccontextmanager
from typing import Any

from aiokafka import AIOKafkaProducer

from paysaga.domain.payment import derived_id
from paysaga.schemas.codec import AvroCodec
from paysaga.schemas.registry import SchemaRegistry
from paysaga.streams.app.kafka_io import read_all
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import Topics, create_topics, topic_specs
from paysaga.streams.dev.simulators import (
    GatewayConfig,
    InventoryConfig,
    ShippingConfig,
    gateway_decider,
    gateway_fault,
    run_simulator,
)
from paysaga.streams.engine.partitioner import partition_for
from tests.support import settings_env

CODEC = AvroCodec(SchemaRegistry())
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
PAYMENT_OUT = ("authorized", "captured", "failed", "reversed", "settled")
RECORD_OF = {
    "authorized": "PaymentAuthorized",
    "captured": "PaymentCaptured",
    "failed": "PaymentFailed",
    "reversed": "PaymentReversed",
    "settled": "PaymentSettled",
    "inventory_events": "InventoryEvent",
    "shipping_events": "ShippingEvent",
}


# ---- helpers --------------------------------------------------------------------------------
async def _create(settings: Settings, *attrs: str) -> Topics:
    t = Topics(settings.topic_prefix)
    names = {getattr(t, a) for a in attrs}
    await create_topics(settings, [s for s in topic_specs(settings) if s.name in names], log=None)
    return t


def payment_command(n: int, action: str = "AUTHORIZE", key: str | None = None, attempt: int = 1,
                    command_id: str | None = None) -> dict[str, Any]:  # fmt: skip
    key = key or f"pay_{n}:{action.lower()}"
    return {
        "event_id": derived_id("test-cmd", key, str(attempt), command_id or ""),
        "occurred_at": T0 + n * 1000 + attempt,
        "payment_id": f"pay_{n}",
        "correlation_id": f"ord_{n}",
        "causation_id": None,
        "command_id": command_id or derived_id(key, "attempt", str(attempt)),
        "idempotency_key": key,
        "command_type": action,
        "amount_minor": 1000 + n,
        "currency": "EUR",
        "merchant_id": "m_001",
        "card_token": "tok_abcdefghijkmnopqrstu",
        "attempt": attempt,
    }


def service_command(record: str, n: int, action: str, attempt: int = 1) -> dict[str, Any]:
    key = f"pay_{n}:{action.lower()}"
    cmd = {
        "event_id": derived_id("test-cmd", key, str(attempt)),
        "occurred_at": T0 + n,
        "payment_id": f"pay_{n}",
        "correlation_id": f"ord_{n}",
        "causation_id": None,
        "command_id": derived_id(key, "attempt", str(attempt)),
        "idempotency_key": key,
        "command_type": action,
        "order_id": f"ord_{n}",
    }
    if record == "InventoryCommand":
        cmd["items"] = [{"sku": f"sku_{n:04d}", "quantity": 1}]
    else:
        cmd["address_country"] = "DE"
    return cmd


async def _send(settings: Settings, topic: str, record: str, cmds: list[Any]) -> None:
    """Send commands (dicts are encoded as `record`, bytes go as they are) in order."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        n = len(await producer.partitions_for(topic))
        for cmd in cmds:
            if isinstance(cmd, bytes):
                await producer.send(topic, cmd, key=b"junk")
                continue
            key = cmd["payment_id"].encode()
            value = CODEC.encode(record, cmd)
            await producer.send(topic, value, key=key, partition=partition_for(key, n))
        await producer.flush()
    finally:
        await producer.stop()


async def _outputs(settings: Settings, *attrs: str) -> list[tuple[str, Any, dict[str, Any]]]:
    """Every committed answer on the topics named by Topics attributes: (attr, record, dict)."""
    t = Topics(settings.topic_prefix)
    by_topic = {getattr(t, a): a for a in attrs}
    records = await read_all(settings.bootstrap, *by_topic, timeout=10)
    out = []
    for r in records:
        attr = by_topic[r.topic]
        out.append((attr, r, CODEC.decode(r.value, RECORD_OF[attr])))
    return out


async def _until(settings: Settings, attrs: tuple[str, ...], count: int, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        got = await _outputs(settings, *attrs)
        if len(got) >= count:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(got)} of {count} answers after {timeout}s: {got}")
        await asyncio.sleep(0.1)


@asynccontextmanager
async def running(kind: str, settings: Settings, config: Any):
    """The simulator as a task; yields its stats after a clean stop."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_simulator(kind, settings, config, stop, stats_out=None))
    stats: Counter[str] = Counter()
    try:
        yield stats
    finally:
        stop.set()
        stats.update(await asyncio.wait_for(task, 10))


def _check_placement(answers: list[tuple[str, Any, dict[str, Any]]]) -> None:
    for _, r, rec in answers:
        assert r.key == rec["payment_id"].encode()
        assert r.partition == partition_for(r.key, 3)


# ---- gateway --------------------------------------------------------------------------------
def test_gateway_decides_by_key_and_replays_identical_bytes(settings: Settings) -> None:
    cfg = GatewayConfig(approval_rate=0.5, capture_failure_rate=0.5, transient_error_rate=0.0,
                        timeout_rate=0.0, latency_ms=3, seed=7)  # fmt: skip

    async def go() -> None:
        t = await _create(settings, "commands", *PAYMENT_OUT)
        auths = [payment_command(n) for n in range(12)]
        others = [payment_command(20 + i, a) for i, a in
                  enumerate(("CAPTURE", "CAPTURE", "VOID", "REFUND", "SETTLE"))]  # fmt: skip
        # Retries: same idempotency key, another attempt and command_id.
        again = [payment_command(n, attempt=2) for n in (0, 1, 2)]
        junk = b"\x13\x37 not avro"
        async with running("gateway", settings, cfg) as stats:
            await _send(settings, t.commands, "PaymentCommand", [*auths, junk, *others, *again])
            answers = await _until(settings, PAYMENT_OUT, 20)

        assert stats["undecodable"] == 1 and stats["replayed"] == 3 and stats["commands"] == 21
        assert len(await _outputs(settings, *PAYMENT_OUT)) == 20  # nothing more came
        _check_placement(answers)
        decide = gateway_decider(cfg, t)
        by_event: dict[str, list] = {}
        for attr, r, rec in answers:
            by_event.setdefault(rec["event_id"], []).append((attr, r.value, rec))
        for cmd in auths + others:
            (topic, _, expected), *_ = decide(cmd).outputs
            got = by_event[expected["event_id"]]
            assert getattr(t, got[0][0]) == topic and got[0][2] == expected
            assert expected["command_id"] == cmd["command_id"]
            assert expected["occurred_at"] == cmd["occurred_at"] + 3
        # Deterministic by key, a mix of both, and another seed decides otherwise.
        approved = [by_event[decide(c).outputs[0][2]["event_id"]][0][0] == "authorized"
                    for c in auths]  # fmt: skip
        assert 0 < sum(approved) < len(auths)
        other = gateway_decider(GatewayConfig(approval_rate=0.5, seed=8), t)
        assert [other(c).outputs[0][1] == "PaymentAuthorized" for c in auths] != approved
        # A retry gets the very same bytes, command_id of the first processing included.
        for retry in again:
            first = next(c for c in auths if c["idempotency_key"] == retry["idempotency_key"])
            (_, value1, rec1), (_, value2, _) = by_event[decide(first).outputs[0][2]["event_id"]]
            assert value1 == value2 and rec1["command_id"] == first["command_id"]
        kinds = {(a, rec.get("kind"), rec.get("reason_code")) for a, _, rec in answers}
        assert {("reversed", "VOID", None), ("reversed", "REFUND", None)} <= kinds
        settled = next(rec for a, _, rec in answers if a == "settled")
        assert settled["settlement_date"] == "2026-01-01" and settled["amount_minor"] == 1024

    asyncio.run(go())


def _command_ids(cfg: GatewayConfig, key: str, fate: str | None, n: int = 1) -> list[str]:
    """`n` command ids whose attempt has `fate` under `cfg` (decided by the command id)."""
    ids = (derived_id(key, "attempt", str(a)) for a in range(1, 1000))
    return [c for c in ids if gateway_fault(cfg, c) == fate][:n]


def test_gateway_transient_error_and_timeout_then_retry(settings: Settings) -> None:
    cfg = GatewayConfig(approval_rate=1.0, transient_error_rate=0.4, timeout_rate=0.4,
                        latency_ms=0, seed=3)  # fmt: skip
    a, b = "pay_1:authorize", "pay_2:authorize"
    (a_transient,), (a_ok,) = _command_ids(cfg, a, "transient"), _command_ids(cfg, a, None)
    (b_timeout,), (b_ok,) = _command_ids(cfg, b, "timeout"), _command_ids(cfg, b, None)
    (b_unlucky,) = _command_ids(cfg, b, "transient")
    a1 = payment_command(1, key=a, attempt=1, command_id=a_transient)
    a2 = payment_command(1, key=a, attempt=2, command_id=a_ok)
    b1 = payment_command(2, key=b, attempt=1, command_id=b_timeout)
    b2 = payment_command(2, key=b, attempt=2, command_id=b_ok)
    # A stored key is answered from the store, whatever fate this attempt would have had.
    b3 = payment_command(2, key=b, attempt=3, command_id=b_unlucky)

    async def go() -> None:
        t = await _create(settings, "commands", *PAYMENT_OUT)
        async with running("gateway", settings, cfg) as stats:
            await _send(settings, t.commands, "PaymentCommand", [a1, b1])
            (answer,) = await _until(settings, PAYMENT_OUT, 1)
            await _send(settings, t.commands, "PaymentCommand", [a2, b2, b3])
            answers = await _until(settings, PAYMENT_OUT, 4)
        assert stats["transient"] == 1 and stats["timeout"] == 1 and stats["replayed"] == 2
        assert len(await _outputs(settings, *PAYMENT_OUT)) == 4
        _check_placement(answers)

        attr, _, failed = answer
        assert attr == "failed" and failed["command_id"] == a_transient
        assert failed["retryable"] is True and failed["reason_code"] == "gateway_unavailable"
        assert failed["step"] == "authorize"
        assert failed["event_id"] == derived_id(a_transient, "gateway", "transient")
        # The retry after a transient error is processed afresh: the real result.
        (fresh,) = [rec for a_, _, rec in answers if rec["command_id"] == a_ok]
        assert fresh["payment_id"] == "pay_1" and fresh["amount_minor"] == 1001
        assert fresh["event_id"] == derived_id(a, "gateway", "result")
        assert fresh["authorization_code"] and fresh["occurred_at"] == a2["occurred_at"]
        # The timed-out attempt answered nothing itself; its retries get its stored result.
        pay2 = [(a_, r.value, rec) for a_, r, rec in answers if rec["payment_id"] == "pay_2"]
        assert [a_ for a_, *_ in pay2] == ["authorized", "authorized"]
        assert pay2[0][1] == pay2[1][1] and pay2[0][2]["command_id"] == b_timeout
        assert pay2[0][2]["event_id"] == derived_id(b, "gateway", "result")

    asyncio.run(go())


# ---- inventory and shipping -----------------------------------------------------------------
async def _service_phase(
    settings: Settings, t: Topics, inv_rate: float, ship_rate: float, base: int, total: int
) -> tuple[list[dict], list[dict]]:
    """Run inventory and shipping with these failure rates; their answers to new commands."""
    inv = [service_command("InventoryCommand", base + n, "RESERVE") for n in range(4)]
    inv.append(service_command("InventoryCommand", base, "RELEASE"))
    retry = service_command("InventoryCommand", base + 1, "RESERVE", attempt=2)
    ship = [service_command("ShippingCommand", base + n, "CREATE_SHIPMENT") for n in range(4)]
    ship.append(service_command("ShippingCommand", base, "CANCEL_SHIPMENT"))
    async with (
        running("inventory", settings, InventoryConfig(failure_rate=inv_rate, seed=5)) as si,
        running("shipping", settings, ShippingConfig(failure_rate=ship_rate, seed=5)) as ss,
    ):
        await _send(settings, t.inventory_commands, "InventoryCommand", [*inv, retry])
        await _send(settings, t.shipping_commands, "ShippingCommand", ship)
        answers = await _until(settings, ("inventory_events", "shipping_events"), total)
    assert si["replayed"] == 1 and ss["replayed"] == 0
    assert len(await _outputs(settings, "inventory_events", "shipping_events")) == total
    ids = {f"pay_{base + n}" for n in range(4)}
    mine = [(a, r, rec) for a, r, rec in answers if rec["payment_id"] in ids]
    assert len(mine) == 11  # 6 inventory answers (the retry's: the same bytes again), 5 shipping
    _check_placement(mine)
    by_cmd: dict[str, list] = {}
    for _, r, rec in mine:
        by_cmd.setdefault(rec["command_id"], []).append((r.value, rec))
    (first, _), (again, _) = by_cmd[inv[1]["command_id"]]
    assert first == again
    for cmd in [*inv, *ship]:
        rec = by_cmd[cmd["command_id"]][0][1]
        assert rec["causation_id"] == cmd["event_id"]
        assert rec["occurred_at"] == cmd["occurred_at"] + 5  # the default latency
    return [by_cmd[c["command_id"]][0][1] for c in inv], [
        by_cmd[c["command_id"]][0][1] for c in ship
    ]


def test_inventory_and_shipping_failure_rates(settings: Settings) -> None:
    async def go() -> None:
        t = await _create(settings, "inventory_commands", "inventory_events",
                          "shipping_commands", "shipping_events")  # fmt: skip
        inv, ship = await _service_phase(settings, t, 1.0, 0.0, base=0, total=11)
        assert [r["outcome"] for r in inv] == ["RESERVATION_FAILED"] * 4 + ["RELEASED"]
        assert all(r["reason"].startswith("out_of_stock: sku_") for r in inv[:4])
        assert [r["outcome"] for r in ship] == ["CREATED"] * 4 + ["CANCELLED"]
        assert {r["reason"] for r in ship} == {None}
        # The same consumer groups resume after their committed offsets: total 22, not more.
        inv, ship = await _service_phase(settings, t, 0.0, 1.0, base=100, total=22)
        assert [r["outcome"] for r in inv] == ["RESERVED"] * 4 + ["RELEASED"]
        assert [r["outcome"] for r in ship] == ["CREATION_FAILED"] * 4 + ["CANCELLED"]
        assert {r["reason"] for r in ship[:4]} <= {"address_unserviceable", "carrier_unavailable"}

    asyncio.run(go())


# ---- the CLI --------------------------------------------------------------------------------
def test_cli_simulate_gateway_runs_until_sigterm(settings: Settings) -> None:
    """Another process (its own hash salt) decides exactly as this one: by seed and key."""
    t = asyncio.run(_create(settings, "commands", *PAYMENT_OUT))
    env = {**settings_env(settings), "PAYSAGA_SIM_APPROVAL_RATE": "0.5"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "paysaga.streams.ops.cli", "simulate", "gateway", "--seed", "11",
         "--transient-error-rate", "0", "--timeout-rate", "0", "--latency-ms", "1"],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        cmds = [payment_command(n) for n in range(8)]
        asyncio.run(_send(settings, t.commands, "PaymentCommand", cmds))
        answers = asyncio.run(_until(settings, PAYMENT_OUT, 8, timeout=20))
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "sim gateway: 8 commands" in err and "emitted=8" in err
    decide = gateway_decider(GatewayConfig(approval_rate=0.5, seed=11, latency_ms=1), t)
    expected = {(o[0], o[2]["event_id"]): o[2] for c in cmds for o in decide(c).outputs}
    got = {(getattr(t, a), rec["event_id"]): rec for a, _, rec in answers}
    assert got == expected
