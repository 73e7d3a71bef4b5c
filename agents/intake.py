"""Intake: payment.initiated (Avro) -> payments table + payment.status, or payment.dlq.

`IntakeStep` is the per-record logic with no Faust in it (decode, validate, decide); the
agent registered by `register_intake` is the glue that reads the table, writes it and sends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faust
from pydantic import ValidationError

from paysaga.agents.dlq import DeadLetter
from paysaga.domain.payment import Payment, initiate, status_event
from paysaga.schemas.codec import AvroCodec, DecodeError
from paysaga.schemas.models import PaymentInitiated, validation_reason

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


def register_intake(
    app: faust.App,
    step: IntakeStep,
    source: faust.TopicT,
    status_topic: faust.TopicT,
    dlq_topic: faust.TopicT,
    payments: faust.Table,
) -> Any:
    """Register the intake agent on `app`."""

    @app.agent(source, name="paysaga.intake")
    async def intake(stream: faust.StreamT) -> None:
        async for event in stream.events():
            msg = event.message
            parsed = step.parse(event.value)
            if isinstance(parsed, Rejected):
                letter = DeadLetter(
                    parsed.kind, parsed.reason, msg.topic, msg.partition, msg.offset
                )
                await dlq_topic.send(key=msg.key, value=event.value, headers=letter.headers())
                continue
            key = parsed.payment_id.encode()
            out = step.apply(parsed, payments.get(key))
            if out.store is not None:
                payments[key] = out.store
            await status_topic.send(key=key, value=out.status)

    return intake
