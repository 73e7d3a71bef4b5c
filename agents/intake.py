"""Intake: payment.initiated (Avro) -> idempotency decision -> the saga, or payment.dlq.

Stage one of the payment topology. A request is decided where its idempotency scope
(merchant_id, idempotency_key) lives, because two requests with one key may carry
different payment ids and so belong to different payment partitions:

- NEW: remembered (fingerprint, payment, expiry) and forwarded to `paysaga.payment.accepted`
  keyed by payment_id, where the saga agent creates the payment and starts its saga;
- REPLAY (same key, same fingerprint): forwarded too, marked as a replay; the saga agent
  re-emits the payment's stored outcome, no new work;
- CONFLICT (same key, other request): an IDEMPOTENCY_CONFLICT status, no state change.

`IntakeStep` is the per-record logic with no Kafka in it (decode, validate); the agents are
glue inside the engine's transaction for the record's partition. `IntakeStep.apply` is the
single-hop intake the benchmark measures against its baselines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiokafka.structs import ConsumerRecord
from pydantic import ValidationError

from paysaga.domain.idempotency import Decision, KeyRecord, decide, fingerprint, scope_key
from paysaga.domain.payment import Payment, derived_id, initiate, status_event
from paysaga.schemas.codec import AvroCodec, DecodeError
from paysaga.schemas.models import PaymentInitiated, validation_reason
from paysaga.streams.app.topics import Topics
from paysaga.streams.engine.core import AgentSpec, Context
from paysaga.streams.engine.partitioner import partition_for
from paysaga.tables.idempotency import IDEMPOTENCY
from paysaga.tables.timers import TimerIndex, advance_stream_time, stream_time

INITIATED = "PaymentInitiated"
STATUS = "PaymentStatusChanged"
#: Header on paysaga.payment.accepted: b"new" or b"replay".
H_INTAKE = "paysaga.intake"
EXPIRY = TimerIndex("idempotency-expiry")
_dumps = json.JSONEncoder(separators=(",", ":")).encode


@dataclass(frozen=True)
class Accepted:
    """A record that changes (or replays) a payment: what to store and what to emit."""

    payment_id: str
    store: dict[str, Any] | None  # None: state unchanged (a replay)
    status: bytes


@dataclass(frozen=True)
class Rejected:
    kind: str
    reason: str


class IntakeStep:
    """Decode, validate and apply one PaymentInitiated against the current payment state."""

    def __init__(self, codec: AvroCodec) -> None:
        self.codec = codec

    def parse(self, value: bytes | None) -> PaymentInitiated | Rejected:
        if value is None:
            return Rejected("decode", "empty record value (tombstone) on payment.initiated")
        try:
            raw = self.codec.decode(value, INITIATED)
        except DecodeError as exc:
            return Rejected("decode", f"{exc.reason}: {exc}")
        try:
            return PaymentInitiated.model_validate(raw)
        except ValidationError as exc:
            return Rejected("validation", validation_reason(exc))

    def apply(self, event: PaymentInitiated, current: dict[str, Any] | None) -> Accepted:
        if current is not None:
            # The payment exists: no new work, re-emit its stored outcome as a replay.
            payment = Payment.from_table(current)
            status = status_event(
                payment,
                cause_event_id=event.event_id,
                occurred_at=event.occurred_at,
                previous=payment.status.value,
                replay=True,
            )
            return Accepted(event.payment_id, None, self.codec.encode(STATUS, status))
        payment = initiate(event)
        status = status_event(
            payment, cause_event_id=event.event_id, occurred_at=event.occurred_at, previous=None
        )
        return Accepted(event.payment_id, payment.to_table(), self.codec.encode(STATUS, status))


def conflict_status(event: PaymentInitiated, holder: str) -> dict[str, Any]:
    """The IDEMPOTENCY_CONFLICT outcome for a request whose key another request holds."""
    return {
        "event_id": derived_id(event.event_id, "status", event.payment_id, "conflict"),
        "occurred_at": event.occurred_at,
        "payment_id": event.payment_id,
        "correlation_id": event.correlation_id,
        "causation_id": event.event_id,
        "merchant_id": event.merchant_id,
        "idempotency_key": event.idempotency_key,
        "status": "IDEMPOTENCY_CONFLICT",
        "previous_status": None,
        "amount_minor": event.amount_minor,
        "currency": event.currency,
        "replay": False,
        "reason": f"idempotency key already used for a different request (payment {holder})",
    }


def intake_agents(
    step: IntakeStep, topics: Topics, partitions: int, ttl_ms: int
) -> list[AgentSpec]:
    """The idempotency stage: payment.initiated and its re-keyed copy."""

    def process(ctx: Context, record: ConsumerRecord) -> None:
        parsed = step.parse(record.value)
        if isinstance(parsed, Rejected):
            ctx.dead_letter(parsed.kind, parsed.reason, topics.dlq)
            return
        scope = scope_key(parsed.merchant_id, parsed.idempotency_key).encode()
        if partition_for(scope, partitions) != record.partition:
            # Upstream's partitioning is not ours to trust: re-key by scope, same transaction.
            ctx.send(topics.initiated_repartition, scope, record.value, list(record.headers or ()))
            return
        table = ctx.table(IDEMPOTENCY)
        advance_stream_time(table, parsed.occurred_at)
        raw = table.get(scope)
        stored = None if raw is None else KeyRecord.from_json(json.loads(raw))
        fp = fingerprint(parsed.to_avro())
        decision, new = decide(stored, fp, parsed.payment_id, parsed.event_id,
                               parsed.occurred_at, ttl_ms)  # fmt: skip
        key = parsed.payment_id.encode()
        if decision is Decision.CONFLICT:
            assert stored is not None
            status = conflict_status(parsed, stored.payment_id)
            ctx.send(topics.status, key, step.codec.encode(STATUS, status))
            return
        if new is not None:
            EXPIRY.move(table, scope, None if stored is None else stored.expires_at,
                        new.expires_at)  # fmt: skip
            table.set(scope, _dumps(new.to_json()).encode())
        tag = b"new" if decision is Decision.NEW else b"replay"
        ctx.send(topics.accepted, key, record.value, [(H_INTAKE, tag)])

    return [
        AgentSpec("paysaga.intake", topics.initiated, process, (IDEMPOTENCY,)),
        AgentSpec("paysaga.intake.rekeyed", topics.initiated_repartition, process, (IDEMPOTENCY,)),
    ]


def purge_expired_keys(ctx: Context, now_ms: int) -> None:
    """Punctuator: drop idempotency keys whose lifetime ended by this partition's event time."""
    table = ctx.table(IDEMPOTENCY)
    upto = stream_time(table)
    if upto < 0:
        return
    for due, scope in EXPIRY.due(table, upto):
        raw = table.get(scope)
        if raw is not None and KeyRecord.from_json(json.loads(raw)).expires_at == due:
            table.delete(scope)
        EXPIRY.move(table, scope, due, None)
