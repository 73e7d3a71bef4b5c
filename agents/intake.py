"""Intake: payment.initiated (Avro) -> payments table + payment.status, or payment.dlq.

`IntakeStep` is the per-record logic with no Kafka in it (decode, validate, decide); the
agents built by `intake_agents` are the glue that reads the table, writes it and sends, inside
the engine's transaction for the record's partition.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiokafka.structs import ConsumerRecord
from pydantic import ValidationError

from paysaga.domain.payment import Payment, initiate, status_event
from paysaga.schemas.codec import AvroCodec, DecodeError
from paysaga.schemas.models import PaymentInitiated, validation_reason
from paysaga.streams.engine import AgentSpec, Context
from paysaga.streams.partitioner import partition_for
from paysaga.tables.payments import PAYMENTS

INITIATED = "PaymentInitiated"
STATUS = "PaymentStatusChanged"


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


def intake_agents(
    step: IntakeStep,
    source: str,
    repartition_topic: str,
    status_topic: str,
    dlq_topic: str,
    partitions: int,
) -> list[AgentSpec]:
    """The intake agents: glue between the engine's context and `IntakeStep`.

    State for a payment lives in the partition its payment_id maps to under paysaga's
    partitioner. Upstream may key or partition differently (librdkafka's default is crc32,
    not murmur2), so a record found on another partition is forwarded, inside the same
    transaction, to `repartition_topic` keyed by payment_id; the same logic reads it there.
    """
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    loads = json.loads

    def process(ctx: Context, record: ConsumerRecord) -> None:
        parsed = step.parse(record.value)
        if isinstance(parsed, Rejected):
            ctx.dead_letter(parsed.kind, parsed.reason, dlq_topic)
            return
        key = parsed.payment_id.encode()
        if partition_for(key, partitions) != record.partition:
            ctx.send(repartition_topic, key, record.value, list(record.headers or ()))
            return
        payments = ctx.table(PAYMENTS)
        current = payments.get(key)
        out = step.apply(parsed, None if current is None else loads(current))
        if out.store is not None:
            payments.set(key, dumps(out.store).encode())
        ctx.send(status_topic, key, out.status)

    return [
        AgentSpec("paysaga.intake", source, process, tables=(PAYMENTS,)),
        AgentSpec("paysaga.intake.repartitioned", repartition_topic, process, (PAYMENTS,)),
    ]
