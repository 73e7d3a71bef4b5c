"""A test playing the outside world around one paysaga worker, through the real broker.

It sends upstream requests and the services' answers (Avro, keyed by payment_id with
paysaga's partitioner), and reads back committed commands, statuses and dead letters.
Waiting is always a poll with a deadline.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from paysaga.agents.outputs import COMMAND_SCHEMAS
from paysaga.schemas.codec import AvroCodec
from paysaga.schemas.registry import SchemaRegistry
from paysaga.streams.app.kafka_io import read_all
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import Topics
from paysaga.streams.engine.deadletter import parse_headers
from paysaga.streams.engine.driver import TopologyTestDriver
from paysaga.streams.engine.partitioner import partition_for
from tests.support import WorkerProcess, settings_env, wait_for

CODEC = AvroCodec(SchemaRegistry())
#: The simulators' faults in the end-to-end runs with them: declines, capture failures,
#: transient errors, timeouts (commands silently answered late), service failures.
SIMULATOR_FAULTS = {
    "PAYSAGA_SIM_APPROVAL_RATE": "0.85", "PAYSAGA_SIM_CAPTURE_FAILURE_RATE": "0.03",
    "PAYSAGA_SIM_TRANSIENT_ERROR_RATE": "0.05", "PAYSAGA_SIM_TIMEOUT_RATE": "0.03",
    "PAYSAGA_SIM_FAILURE_RATE": "0.05", "PAYSAGA_SIM_LATENCY_MS": "2", "PAYSAGA_SIM_SEED": "7",
}  # fmt: skip


def simulators(settings: Settings, tmp: Path) -> list[subprocess.Popen]:
    """The simulated gateway, inventory and shipping, with SIMULATOR_FAULTS, each in its
    own process logging to `tmp`."""
    env = {**settings_env(settings), **SIMULATOR_FAULTS}
    procs = []
    for kind in ("gateway", "inventory", "shipping"):
        log = open(tmp / f"sim-{kind}.log", "ab")  # noqa: SIM115 - owned by the child
        cmd = [sys.executable, "-m", "paysaga.streams.ops.cli", "simulate", kind]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(10)


def live_history(settings: Settings, tmp: Path, payments: int, seed: int) -> None:
    """A live history: `payments` payments (duplicates, conflicts, orders) through every
    saga path with the simulators, until 85 % of the sagas ended; then the worker and the
    simulators stopped, so the live topics stand still."""
    from paysaga.streams.dev.upstream import UpstreamConfig, produce

    sims = simulators(settings, tmp)
    worker = WorkerProcess(settings, tmp / "worker.log").start()
    world = World(settings)
    try:
        cfg = UpstreamConfig(count=payments, seed=seed, duplicate_rate=0.05, conflict_rate=0.02,
                             manual_capture_rate=0.0, order_rate=0.3)  # fmt: skip
        topic = Topics(settings.topic_prefix).initiated
        asyncio.run(produce(settings.bootstrap, CODEC, cfg, rate=200, topic=topic, progress=False))
        ended = lambda: {s["payment_id"] for s in world.statuses() if s["terminal"]}  # noqa: E731
        wait_for(lambda: len(ended()) >= payments * 0.85, 240, what="the live sagas ending")
    finally:
        worker.stop()
        stop_all(sims)


def new_id() -> str:
    return str(uuid.uuid4())


class World:
    """Upstream, gateway, inventory and shipping, as one test drives them."""

    #: How long a wait polls for what was sent to be processed.
    patience = 60.0

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.t = Topics(settings.topic_prefix)
        self.command_topics = {"payment": self.t.commands, "inventory": self.t.inventory_commands,
                               "shipping": self.t.shipping_commands}  # fmt: skip

    # ---- sending ------------------------------------------------------------------------
    def send(self, topic: str, schema: str, record: dict[str, Any], partition: int | None = None,
             headers: list | None = None) -> None:  # fmt: skip
        async def go() -> None:
            producer = AIOKafkaProducer(bootstrap_servers=self.settings.bootstrap)
            await producer.start()
            try:
                key = record["payment_id"].encode()
                part = (
                    partition_for(key, self.settings.partitions) if partition is None else partition
                )
                value = CODEC.encode(schema, record)
                await producer.send_and_wait(topic, value, key=key, partition=part,
                                             headers=headers)  # fmt: skip
            finally:
                await producer.stop()

        asyncio.run(go())

    def initiate(self, event: dict[str, Any]) -> dict[str, Any]:
        self.send(self.t.initiated, "PaymentInitiated", event)
        return event

    def request(self, payment: dict[str, Any], kind: str, key: str, amount: int | None = None,
                occurred_at: int | None = None) -> dict[str, Any]:  # fmt: skip
        record = {
            "event_id": new_id(), "occurred_at": occurred_at or payment["occurred_at"] + 1000,
            "payment_id": payment["payment_id"], "correlation_id": payment["order_id"],
            "causation_id": None, "request_type": kind, "idempotency_key": key,
            "merchant_id": payment["merchant_id"], "amount_minor": amount,
            "currency": None if amount is None else payment["currency"], "reason": None,
        }  # fmt: skip
        self.send(self.t.requests, "PaymentRequest", record)
        return record

    def answer(self, cmd: dict[str, Any], kind: str, event_id: str | None = None,
               amount: int | None = None, **extra: Any) -> dict[str, Any]:  # fmt: skip
        """Send the answer `kind` (AUTHORIZED, CAPTURED, FAILED, VOIDED, REFUNDED, SETTLED,
        RESERVED, RESERVATION_FAILED, RELEASED, CREATED, CREATION_FAILED, CANCELLED)."""
        env = {"event_id": event_id or new_id(), "occurred_at": cmd["occurred_at"] + 10,
               "payment_id": cmd["payment_id"], "correlation_id": cmd["correlation_id"],
               "causation_id": cmd["event_id"], "command_id": cmd["command_id"]}  # fmt: skip
        amount = cmd.get("amount_minor") if amount is None else amount
        money = {"amount_minor": amount, "currency": cmd.get("currency")}
        ref = "gw_" + cmd["command_id"][:8]
        t = self.t
        if kind in ("RESERVED", "RESERVATION_FAILED", "RELEASED"):
            topic, schema = t.inventory_events, "InventoryEvent"
            record = {**env, "outcome": kind, "reason": extra.get("reason")}
        elif kind in ("CREATED", "CREATION_FAILED", "CANCELLED"):
            topic, schema = t.shipping_events, "ShippingEvent"
            record = {**env, "outcome": kind, "reason": extra.get("reason")}
        elif kind == "AUTHORIZED":
            topic, schema = t.authorized, "PaymentAuthorized"
            record = {**env, **money, "authorization_code": "A1", "gateway_reference": ref}
        elif kind == "CAPTURED":
            topic, schema = t.captured, "PaymentCaptured"
            record = {**env, **money, "merchant_id": cmd["merchant_id"],
                      "gateway_reference": ref, "capture_id": "cap_" + ref}  # fmt: skip
        elif kind == "FAILED":
            topic, schema = t.failed, "PaymentFailed"
            record = {**env, "reason_code": extra.get("code", "card_declined"),
                      "reason": extra.get("reason", "declined"),
                      "step": cmd["command_type"].lower(),
                      "retryable": extra.get("retryable", False)}  # fmt: skip
        elif kind in ("VOIDED", "REFUNDED"):
            topic, schema = t.reversed, "PaymentReversed"
            record = {**env, **money, "kind": "VOID" if kind == "VOIDED" else "REFUND",
                      "reversal_id": "rev_" + ref}  # fmt: skip
        elif kind == "SETTLED":
            topic, schema = t.settled, "PaymentSettled"
            record = {**env, **money, "merchant_id": cmd["merchant_id"],
                      "settlement_id": "set_" + ref, "settlement_date": "2026-11-22"}  # fmt: skip
        else:
            raise ValueError(kind)
        self.send(topic, schema, record)
        return record

    # ---- reading ------------------------------------------------------------------------
    def _read(self, topic: str) -> list[Any]:
        """Every committed record of `topic` (key, value, headers, partition, offset)."""
        return asyncio.run(read_all(self.settings.bootstrap, topic))

    def retries(self, payment_id: str | None = None) -> list[dict[str, Any]]:
        """Every committed RetryScheduled record, of every level, each with its `topic`."""
        out = []
        for level in range(1, self.settings.retry_policy().levels + 1):
            for r in self._read(self.t.retry(level)):
                rec = CODEC.decode(r.value, "RetryScheduled")
                if payment_id is None or rec["payment_id"] == payment_id:
                    out.append({**rec, "_offset": (r.partition, r.offset)})
        return out

    def commands(self, payment_id: str | None = None) -> list[dict[str, Any]]:
        """Every committed command (of every service), each with its `service`."""
        out = []
        for service, topic in self.command_topics.items():
            for r in self._read(topic):
                cmd = CODEC.decode(r.value, COMMAND_SCHEMAS[service])
                if payment_id is None or cmd["payment_id"] == payment_id:
                    out.append({**cmd, "service": service, "_offset": (r.partition, r.offset),
                                "_timestamp": r.timestamp})  # fmt: skip
        return out

    def statuses(self, payment_id: str | None = None) -> list[dict[str, Any]]:
        records = self._read(self.t.status)
        decoded = [CODEC.decode(r.value, "PaymentStatusChanged") for r in records]
        return [s for s in decoded if payment_id is None or s["payment_id"] == payment_id]

    def dead_letters(self) -> list[tuple[bytes | None, dict[str, str]]]:
        records = self._read(self.t.dlq)
        return [(r.key, parse_headers(list(r.headers))) for r in records]

    def wait_command(self, payment_id: str, action: str, n: int = 1,
                     timeout: float | None = None) -> dict[str, Any]:  # fmt: skip
        """The n-th command of type `action` for the payment, once committed."""

        def probe() -> dict[str, Any] | None:
            found = [c for c in self.commands(payment_id) if c["command_type"] == action]
            return found[n - 1] if len(found) >= n else None

        return wait_for(probe, timeout or self.patience, what=f"{action} #{n} for {payment_id}")

    def wait_status(self, payment_id: str, what: str, pred,
                    timeout: float | None = None) -> dict:  # fmt: skip
        def probe() -> dict[str, Any] | None:
            return next((s for s in self.statuses(payment_id) if pred(s)), None)

        return wait_for(probe, timeout or self.patience, what=f"{what} for {payment_id}")

    def terminal(self, payment_id: str, timeout: float | None = None) -> dict[str, Any]:
        return self.wait_status(payment_id, "terminal status", lambda s: s["terminal"], timeout)


@dataclass(frozen=True)
class _Read:
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    partition: int
    offset: int
    timestamp: int | None


class DriverWorld(World):
    """The same outside world around the topology test driver instead of a worker: what it
    sends is processed at once, so every wait is answered by the first look."""

    patience = 0.01

    def __init__(self, settings: Settings, driver: TopologyTestDriver) -> None:
        super().__init__(settings)
        self.driver = driver

    def send(self, topic: str, schema: str, record: dict[str, Any], partition: int | None = None,
             headers: list | None = None) -> None:  # fmt: skip
        key = record["payment_id"].encode()
        part = partition_for(key, self.settings.partitions) if partition is None else partition
        self.driver.pipe(topic, CODEC.encode(schema, record), key, partition=part,
                         timestamp=record["occurred_at"], headers=headers)  # fmt: skip

    def _read(self, topic: str) -> list[Any]:
        return [_Read(o.key, o.value, o.headers, o.partition, i, o.timestamp)
                for i, o in enumerate(self.driver.outputs(topic))]  # fmt: skip
