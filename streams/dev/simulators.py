"""The outside services paysaga's sagas talk to: a card gateway, inventory and shipping.

Each simulator consumes its command topic (read_committed, its own consumer group
``<prefix>paysaga-sim-<kind>``) and answers with Avro single-object encoded outcome events on
the topics a real adapter would use, keyed by ``payment_id`` and placed with paysaga's
partitioner.

The three share ONE consume-decide-produce loop (`run_simulator`); a service is only a
*decider*: a pure function from a decoded command to a `Decision` (the outcome records, and
whether they become the idempotency key's stored result). The loop does the rest:

- **Idempotency, like Stripe.** The first time an ``idempotency_key`` is decided, the exact
  encoded output bytes are stored; any later command with that key gets the SAME bytes again
  (same event_id, and the command_id of the first processing: it is the same record),
  whatever its command_id or attempt. The store lives in process memory, bounded to
  `STORE_LIMIT` keys (oldest evicted first), so it is lost on restart; that is harmless
  because every decision is deterministic (see below): a key decided again after a restart or
  an eviction yields the same outcome and event_id, only command_id/occurred_at may differ,
  and paysaga deduplicates by event_id. A stored key is answered from the store without
  rolling any fault for the new attempt.
- **Determinism.** Outcomes depend only on the service's seed and the idempotency key
  (``random.Random(f"{seed}:{key}")``, a SHA-512 seeding, never Python's salted ``hash()``);
  the gateway's injected faults (transient errors, timeouts) depend on the seed and the
  command_id, so each attempt has its own fate. Event ids are derived (uuid5) from the key
  (outcomes) or the command_id (transient failures). ``occurred_at`` is EVENT time: the
  command's occurred_at plus the configured latency, not the wall clock, so reprocessing a
  command yields byte-identical output.
- **Faults (gateway only).** With ``transient_error_rate`` an attempt is answered with a
  retryable PaymentFailed(reason_code="gateway_unavailable") and nothing is stored for its
  key. With ``timeout_rate`` the command is processed and its result stored, but no response
  is emitted (the answer was lost); a retry with the same key then gets the stored result.
  With ``lost_rate`` the command never reaches the gateway: nothing decided, stored or sent.
  An *outage* (``outage_every_ms`` / ``outage_ms``, by the wall clock) answers every command
  of its windows, stored keys included, with the retryable 503.
- **Inquiries.** An INQUIRE command asks what became of its idempotency key: a stored key is
  answered with its stored outcome (the same bytes: the same event_id, the command_id of the
  attempt that was decided); a key never decided gets PaymentFailed(reason_code=
  "never_seen", step="inquire", command_id = the inquiry's), and nothing is stored.
- **Delivery.** Producer with acks=all and idempotence; a batch's consumer offsets are
  committed only after every output of the batch is acknowledged (at-least-once: duplicates
  are identical bytes). Latency is one sleep per fetched batch. An undecodable command is
  logged (reason and position only, never payload bytes or card data), counted and skipped.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import string
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from aiokafka import AIOKafkaProducer
from aiokafka.errors import CommitFailedError

from paysaga.domain.card import redact
from paysaga.domain.payment import derived_id
from paysaga.domain.retry import INQUIRY_STEP, NEVER_SEEN
from paysaga.schemas.codec import AvroCodec, DecodeError
from paysaga.schemas.registry import SchemaRegistry
from paysaga.streams.app.kafka_io import consumer as make_consumer
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import Topics
from paysaga.streams.dev.upstream import Progress
from paysaga.streams.engine.partitioner import partition_for

__all__ = [
    "SERVICES",
    "STORE_LIMIT",
    "Decision",
    "GatewayConfig",
    "InventoryConfig",
    "ServiceConfig",
    "ShippingConfig",
    "config_for",
    "gateway_decider",
    "gateway_fault",
    "group_id",
    "inventory_decider",
    "run_simulator",
    "run_until_signalled",
    "shipping_decider",
]

log = logging.getLogger(__name__)

#: Idempotency keys remembered per simulator process (oldest evicted first).
STORE_LIMIT = 200_000
#: Commands fetched per batch (one latency sleep, one produce-ack wait, one commit each).
BATCH_MAX = 500

#: One outcome record: (topic, Avro record name, record dict).
Output = tuple[str, str, dict[str, Any]]


# ---- configuration --------------------------------------------------------------------------
def _check_rates(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be within [0, 1], got {value}")
    if cfg.latency_ms < 0:
        raise ValueError(f"latency_ms must be >= 0, got {cfg.latency_ms}")


@dataclass(frozen=True)
class GatewayConfig:
    """The card gateway: outcome rates, injected faults, latency and the decisions' seed."""

    approval_rate: float = 0.9
    capture_failure_rate: float = 0.02
    transient_error_rate: float = 0.03
    timeout_rate: float = 0.02
    lost_rate: float = 0.0
    latency_ms: int = 5
    seed: int = 1
    #: Outage windows by the wall clock: the first `outage_ms` of every `outage_every_ms`
    #: (0: never down).
    outage_every_ms: int = 0
    outage_ms: int = 0

    def __post_init__(self) -> None:
        rates = ("approval_rate", "capture_failure_rate", "transient_error_rate", "timeout_rate",
                 "lost_rate")  # fmt: skip
        _check_rates(self, *rates)
        if self.transient_error_rate + self.timeout_rate + self.lost_rate > 1.0:
            raise ValueError("transient_error_rate + timeout_rate + lost_rate must not exceed 1")
        if (
            self.outage_ms < 0
            or self.outage_every_ms < 0
            or (self.outage_ms and self.outage_ms >= self.outage_every_ms)
        ):
            raise ValueError("an outage needs 0 < outage_ms < outage_every_ms")

    def down(self, now_ms: int) -> bool:
        """Is the gateway in one of its outage windows at `now_ms`?"""
        return bool(self.outage_ms) and now_ms % self.outage_every_ms < self.outage_ms


@dataclass(frozen=True)
class ServiceConfig:
    """Inventory or shipping: share of forward commands (RESERVE, CREATE_SHIPMENT) that
    fail, latency and seed. Their undo commands (RELEASE, CANCEL_SHIPMENT) always succeed."""

    failure_rate: float = 0.05
    latency_ms: int = 5
    seed: int = 1

    def __post_init__(self) -> None:
        _check_rates(self, "failure_rate")


InventoryConfig = ShippingConfig = ServiceConfig


SimConfig = GatewayConfig | ServiceConfig


# ---- deciders (pure) ------------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    """What a service answers to one command it has not seen the idempotency key of.

    ``store``: remember the encoded outputs as the key's result (replayed to later commands
    with the key). ``emit``: send them now (False: the response was lost, a timeout).
    ``label`` names the outcome in the stats line.
    """

    outputs: list[Output]
    store: bool = True
    emit: bool = True
    label: str = "answered"


Decider = Callable[[dict[str, Any]], Decision]


def _rng(seed: int, *parts: str) -> random.Random:
    """A generator determined by the seed and `parts` alone (str seeding is SHA-512)."""
    return random.Random(":".join((str(seed), *parts)))


def _token(rng: random.Random, prefix: str, k: int = 16) -> str:
    return prefix + "".join(rng.choices(string.ascii_lowercase + string.digits, k=k))


def _envelope(cmd: dict[str, Any], event_id: str, occurred_at: int) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "occurred_at": occurred_at,
        "payment_id": cmd["payment_id"],
        "correlation_id": cmd["correlation_id"],
        "causation_id": cmd["event_id"],
        "command_id": cmd["command_id"],
    }


def gateway_fault(
    config: GatewayConfig, command_id: str
) -> Literal["transient", "timeout", "lost"] | None:
    """The injected fault of one command attempt (by its command_id), or None."""
    roll = _rng(config.seed, command_id, "fault").random()
    if roll < config.transient_error_rate:
        return "transient"
    if roll < config.transient_error_rate + config.timeout_rate:
        return "timeout"
    if roll < config.transient_error_rate + config.timeout_rate + config.lost_rate:
        return "lost"
    return None


def _unavailable(cmd: dict[str, Any], at: int, topics: Topics) -> Decision:
    """The gateway's 503: a retryable failure, nothing done, nothing stored."""
    failed = {
        **_envelope(cmd, derived_id(cmd["command_id"], "gateway", "transient"), at),
        "reason_code": "gateway_unavailable",
        "reason": "the gateway did not answer (503); retry with the same key",
        "step": cmd["command_type"].lower(),
        "retryable": True,
    }
    return Decision([(topics.failed, "PaymentFailed", failed)], store=False, label="transient")


def gateway_outage(
    config: GatewayConfig, topics: Topics
) -> Callable[[dict[str, Any]], Decision | None]:
    """Checked before the key store: during an outage nothing is answered, not even a
    stored key (the gateway is down, not forgetful)."""

    def check(cmd: dict[str, Any]) -> Decision | None:
        if not config.down(int(time.time() * 1000)):
            return None
        decision = _unavailable(cmd, cmd["occurred_at"] + config.latency_ms, topics)
        return Decision(decision.outputs, store=False, label="outage")

    return check


def gateway_decider(config: GatewayConfig, topics: Topics) -> Decider:
    """The card gateway: PaymentCommand -> lifecycle events (see the module docstring)."""

    def decide(cmd: dict[str, Any]) -> Decision:
        action, key = cmd["command_type"], cmd["idempotency_key"]
        step = action.lower()
        at = cmd["occurred_at"] + config.latency_ms
        if action == "INQUIRE":  # a stored key was answered from the store already
            unseen = {
                **_envelope(cmd, derived_id(cmd["command_id"], "gateway", "unseen"), at),
                "reason_code": NEVER_SEEN, "step": INQUIRY_STEP, "retryable": True,
                "reason": "no command with this idempotency key reached the gateway",
            }  # fmt: skip
            return Decision([(topics.failed, "PaymentFailed", unseen)], store=False,
                            label="never_seen")  # fmt: skip
        fault = gateway_fault(config, cmd["command_id"])
        if fault == "transient":
            return _unavailable(cmd, at, topics)
        if fault == "lost":
            return Decision([], store=False, emit=False, label="lost")
        rng = _rng(config.seed, key)
        env = _envelope(cmd, derived_id(key, "gateway", "result"), at)
        money = {"amount_minor": cmd["amount_minor"], "currency": cmd["currency"]}
        # One charge reference per payment, as a real gateway's charge id.
        reference = "ch_" + derived_id(cmd["payment_id"], "gateway", "charge").replace("-", "")
        output: Output
        if action == "AUTHORIZE":
            if rng.random() < config.approval_rate:
                code = "".join(rng.choices(string.ascii_uppercase + string.digits, k=6))
                rec = {**env, **money, "authorization_code": code, "gateway_reference": reference}
                output, label = (topics.authorized, "PaymentAuthorized", rec), "approved"
            else:
                rec = {**env, "reason_code": "card_declined", "step": step, "retryable": False,
                       "reason": "the issuer declined the authorization"}  # fmt: skip
                output, label = (topics.failed, "PaymentFailed", rec), "declined"
        elif action == "CAPTURE":
            if rng.random() < config.capture_failure_rate:
                rec = {**env, "reason_code": "capture_failed", "step": step, "retryable": False,
                       "reason": "the acquirer rejected the capture"}  # fmt: skip
                output, label = (topics.failed, "PaymentFailed", rec), "capture_failed"
            else:
                rec = {**env, **money, "merchant_id": cmd["merchant_id"],
                       "gateway_reference": reference,
                       "capture_id": _token(rng, "cap_")}  # fmt: skip
                output, label = (topics.captured, "PaymentCaptured", rec), "captured"
        elif action in ("VOID", "REFUND"):
            rec = {**env, **money, "kind": action, "reversal_id": _token(rng, "rev_"),
                   "merchant_id": cmd["merchant_id"]}  # fmt: skip
            output, label = (topics.reversed, "PaymentReversed", rec), action.lower() + "ed"
        elif action == "SETTLE":
            day = datetime.fromtimestamp(at / 1000, UTC).date().isoformat()
            rec = {**env, **money, "merchant_id": cmd["merchant_id"],
                   "settlement_id": _token(rng, "stl_"), "settlement_date": day}  # fmt: skip
            output, label = (topics.settled, "PaymentSettled", rec), "settled"
        else:  # the schema's enum allows nothing else; a newer writer's symbol lands here
            raise ValueError(f"unknown command_type {action!r}")
        if fault == "timeout":
            return Decision([output], store=True, emit=False, label="timeout")
        return Decision([output], label=label)

    return decide


def _service_decider(
    config: ServiceConfig,
    name: str,
    topic: str,
    record: str,
    undo: tuple[str, str],
    outcomes: tuple[str, str],
    reason: Callable[[random.Random, dict[str, Any]], str],
) -> Decider:
    """A service whose undo command (`undo` = (command, outcome)) always succeeds and whose
    forward command gets `outcomes` = (success, failure) at `config.failure_rate`."""

    def decide(cmd: dict[str, Any]) -> Decision:
        key = cmd["idempotency_key"]
        rng = _rng(config.seed, key)
        rec = {**_envelope(cmd, derived_id(key, name, "result"),
                           cmd["occurred_at"] + config.latency_ms), "reason": None}  # fmt: skip
        if cmd["command_type"] == undo[0]:
            rec["outcome"] = undo[1]
        elif rng.random() < config.failure_rate:
            rec["outcome"], rec["reason"] = outcomes[1], reason(rng, cmd)
        else:
            rec["outcome"] = outcomes[0]
        return Decision([(topic, record, rec)], label=rec["outcome"].lower())

    return decide


def inventory_decider(config: ServiceConfig, topics: Topics) -> Decider:
    """Inventory: RESERVE -> RESERVED or RESERVATION_FAILED; RELEASE -> RELEASED (always)."""

    def out_of_stock(rng: random.Random, cmd: dict[str, Any]) -> str:
        items = cmd["items"]
        return f"out_of_stock: {rng.choice(items)['sku'] if items else 'the order'}"

    return _service_decider(config, "inventory", topics.inventory_events, "InventoryEvent",
                            ("RELEASE", "RELEASED"), ("RESERVED", "RESERVATION_FAILED"),
                            out_of_stock)  # fmt: skip


def shipping_decider(config: ServiceConfig, topics: Topics) -> Decider:
    """Shipping: CREATE_SHIPMENT -> CREATED or CREATION_FAILED; CANCEL_SHIPMENT -> CANCELLED."""

    def unserviceable(rng: random.Random, cmd: dict[str, Any]) -> str:
        return rng.choice(("address_unserviceable", "carrier_unavailable"))

    return _service_decider(config, "shipping", topics.shipping_events, "ShippingEvent",
                            ("CANCEL_SHIPMENT", "CANCELLED"), ("CREATED", "CREATION_FAILED"),
                            unserviceable)  # fmt: skip


@dataclass(frozen=True)
class Service:
    """One simulated service: where its commands come from and how it decides."""

    kind: str
    command_record: str
    command_topic: Callable[[Topics], str]
    config_type: type[SimConfig]
    decider: Callable[[Any, Topics], Decider]


SERVICES: dict[str, Service] = {
    "gateway": Service("gateway", "PaymentCommand", lambda t: t.commands,
                       GatewayConfig, gateway_decider),
    "inventory": Service("inventory", "InventoryCommand", lambda t: t.inventory_commands,
                         InventoryConfig, inventory_decider),
    "shipping": Service("shipping", "ShippingCommand", lambda t: t.shipping_commands,
                        ShippingConfig, shipping_decider),
}  # fmt: skip


def config_for(kind: str, **options: Any) -> SimConfig:
    """The config of service `kind` from options; None values and other services' are ignored."""
    cls = SERVICES[kind].config_type
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in options.items() if k in names and v is not None})


def group_id(kind: str, settings: Settings) -> str:
    return f"{settings.topic_prefix}paysaga-sim-{kind}"


# ---- the shared consume-decide-produce loop -------------------------------------------------
@dataclass(frozen=True)
class _Sent:
    topic: str
    key: bytes
    value: bytes


class _StatsLine(Progress):
    """Progress's throttled one-liner (TTY-aware) for a service with no total: counters."""

    #: What the service counts as its inputs.
    unit = "commands"

    def update(self, done: int, extra: str = "", force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < (0.2 if self.tty else 5.0):
            return
        self.last = now
        rate = done / max(now - self.started, 1e-9)
        line = f"{self.label}: {done} {self.unit} {rate:,.0f}/s {extra}"
        end = "" if self.tty else "\n"
        print(("\r" + line) if self.tty else line, end=end, file=self.out, flush=True)


@dataclass
class _Loop:
    service: Service
    decide: Decider
    codec: AvroCodec
    stats: Counter[str]
    store: dict[str, list[_Sent]] = field(default_factory=dict)
    #: Checked before the key store (the gateway's outages): a Decision overrides all.
    outage: Callable[[dict[str, Any]], Decision | None] | None = None

    def handle(self, topic: str, partition: int, offset: int, value: bytes | None) -> list[_Sent]:
        """The records to send for one command (maybe none); updates store and stats."""
        self.stats["commands"] += 1
        try:
            cmd = self.codec.decode(value or b"", self.service.command_record)
        except DecodeError as exc:
            self.stats["undecodable"] += 1
            log.warning("sim %s: skipped undecodable command at %s[%d]@%d: %s",
                        self.service.kind, topic, partition, offset, exc.reason)  # fmt: skip
            return []
        key = cmd["idempotency_key"]
        down = self.outage(cmd) if self.outage is not None else None
        stored = self.store.get(key) if down is None else None
        if stored is not None:
            self.stats["inquired" if cmd["command_type"] == "INQUIRE" else "replayed"] += 1
            return stored
        try:
            decision = down or self.decide(cmd)
            pkey = cmd["payment_id"].encode()
            sent = [_Sent(t, pkey, self.codec.encode(n, rec)) for t, n, rec in decision.outputs]
        except ValueError as exc:  # EncodeError included: a bug here, not in the command
            self.stats["invalid"] += 1
            log.error("sim %s: cannot answer the command at %s[%d]@%d: %s",
                      self.service.kind, topic, partition, offset, redact(str(exc)))  # fmt: skip
            return []
        self.stats[decision.label] += 1
        if decision.store:
            self.store[key] = sent
            if len(self.store) > STORE_LIMIT:
                del self.store[next(iter(self.store))]  # dicts keep insertion order
        return sent if decision.emit else []


async def run_simulator(
    kind: str,
    settings: Settings,
    config: SimConfig | None = None,
    stop: asyncio.Event | None = None,
    stats_out: TextIO | None = sys.stderr,
) -> Counter[str]:
    """Run the `kind` simulator until `stop` is set (or the task is cancelled).

    Returns the counters (commands, replayed, undecodable, invalid, commit_failed, emitted,
    batches and one per outcome label). A stats line goes to `stats_out` every few seconds
    (None: quiet).
    """
    service = SERVICES[kind]
    config = config if config is not None else service.config_type()
    if not isinstance(config, service.config_type):
        raise TypeError(f"{kind} needs a {service.config_type.__name__}, got {config!r}")
    topics = Topics(settings.topic_prefix)
    stop = stop or asyncio.Event()
    stats: Counter[str] = Counter()
    loop = _Loop(service, service.decider(config, topics), AvroCodec(SchemaRegistry()), stats)
    if isinstance(config, GatewayConfig) and config.outage_ms:
        loop.outage = gateway_outage(config, topics)
    partitions: dict[str, int] = {}
    line = _StatsLine(0, f"sim {kind}", stats_out) if stats_out is not None else None

    def summary() -> str:
        return " ".join(f"{k}={v}" for k, v in sorted(stats.items()) if k != "commands")

    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap,
        client_id=f"paysaga-sim-{kind}",
        acks="all",
        enable_idempotence=True,
        linger_ms=2,
    )

    async def answer(batch: dict[Any, list[Any]]) -> None:
        """Decide every command of the batch, send the answers, wait for all the acks."""
        pending = []
        for records in batch.values():
            for r in records:
                for out in loop.handle(r.topic, r.partition, r.offset, r.value):
                    if out.topic not in partitions:
                        partitions[out.topic] = len(await producer.partitions_for(out.topic))
                    part = partition_for(out.key, partitions[out.topic])
                    pending.append(await producer.send(out.topic, out.value, key=out.key,
                                                       partition=part))  # fmt: skip
        await asyncio.gather(*pending)
        stats["emitted"] += len(pending)

    try:
        await producer.start()
        cons = make_consumer(
            settings.bootstrap, group_id=group_id(kind, settings), client_id=f"paysaga-sim-{kind}"
        )
        try:
            await cons.start()
            cons.subscribe([service.command_topic(topics)])
            while not stop.is_set():
                batch = await cons.getmany(timeout_ms=200, max_records=BATCH_MAX)
                if batch:
                    stats["batches"] += 1
                    if config.latency_ms:
                        await asyncio.sleep(config.latency_ms / 1000)
                    await answer(batch)
                    try:  # only after every answer of the batch is acknowledged
                        await cons.commit({tp: rs[-1].offset + 1 for tp, rs in batch.items()})
                    except CommitFailedError as exc:  # a rebalance: the batch is redelivered
                        stats["commit_failed"] += 1
                        log.warning("sim %s: offset commit failed (%s)", kind, exc)
                if line is not None:
                    line.update(stats["commands"], summary())
        finally:
            await cons.stop()
    finally:
        await producer.stop()
        if line is not None:
            line.close(stats["commands"], summary())
    return stats


def run_until_signalled(kind: str, settings: Settings, config: SimConfig) -> Counter[str]:
    """Run the simulator in the foreground until SIGINT or SIGTERM (the CLI)."""

    async def main() -> Counter[str]:
        stop = asyncio.Event()
        aloop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            aloop.add_signal_handler(sig, stop.set)
        return await run_simulator(kind, settings, config, stop)

    return asyncio.run(main())
