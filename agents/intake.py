"""Intake: payment.initiated (Avro) -> idempotency decision -> the saga, or payment.dlq.

Stage one of the payment topology. A request is decided where its idempotency scope
(merchant_id, idempotency_key) lives, because two requests with one key may carry
different payment ids and so belong to different payment partitions:

- NEW: remembered (fingerprint, payment, expiry) and forwarded to `paysaga.payment.accepted`
  keyed by payment_id, where the saga agent creates the payment and starts its saga;
- REPLAY (same key, same fingerprint): forwarded too, marked as a replay; the saga agent
  re-emits the payment's stored outcome, no new work;
- CONFLICT (same key, other request): an IDEMPOTENCY_CONFLICT status, no state change.

`IntakeStep` is the per-record logic with no Kafka in it (decode, validate); `add_intake`
declares the agent on the processor API: it reads payment.initiated and its re-keyed copy,
keeps the `idempotency` table, and purges expired keys with a stream-time timer (event
time, so a replay purges identically). `IntakeStep.apply` is the single-hop intake the
benchmark measures against its baselines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiokafka.structs import ConsumerRecord
from pydantic import ValidationError

from paysaga.agents.metrics import INTAKE_DECISIONS
from paysaga.agents.outputs import STATUS, compact_json, conflict_status
from paysaga.domain.idempotency import Decision, KeyRecord, decide, fingerprint, scope_key
from paysaga.domain.payment import Payment, initiate, status_event
from paysaga.schemas.codec import AvroCodec, DecodeError
from paysaga.schemas.decoding import MEMO_SIZE, ParsedMemo
from paysaga.schemas.models import PaymentInitiated, validation_reason
from paysaga.streams.app.topics import Topics
from paysaga.streams.engine import BadRecord, ProcessorContext, PunctuationType, Topology
from paysaga.streams.engine.partitioner import partition_for
from paysaga.tables.idempotency import IDEMPOTENCY

INITIATED = "PaymentInitiated"
#: Header on paysaga.payment.accepted: b"new" or b"replay".
H_INTAKE = "paysaga.intake"
#: The stream-time timer that forgets an idempotency key once its lifetime ended.
EXPIRY = "idempotency-expiry"


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

    def __init__(self, codec: AvroCodec, memo: int = MEMO_SIZE) -> None:
        self.codec = codec
        self._parsed: ParsedMemo[PaymentInitiated] = ParsedMemo(memo)

    def decode(self, record: ConsumerRecord) -> PaymentInitiated:
        """The engine's decoder: a validated event, or `BadRecord` (to the DLQ)."""
        parsed = self.parse(record.value)
        if isinstance(parsed, Rejected):
            raise BadRecord(parsed.kind, parsed.reason)
        return parsed

    def parse(self, value: bytes | None, last: bool = False) -> PaymentInitiated | Rejected:
        """The validated event of `value`, or why it is refused.

        The same bytes are read up to three times per payment in one worker: by intake, by
        intake again after the repartition hop, and by the saga from the accepted topic
        (which carries upstream's original bytes, so a dead letter keeps them). Decoding and
        validation are a pure function of the bytes and the event is immutable, so recent
        valid results are kept by value (first in, first out) until their `last` reader
        takes them; a refusal is never kept, since a registry that was unavailable may
        answer next time."""
        if value is not None:
            hit = self._parsed.take(value) if last else self._parsed.get(value)
            if hit is not None:
                return hit
        parsed = self._parse(value)
        if not last and value is not None and isinstance(parsed, PaymentInitiated):
            self._parsed.put(value, parsed)
        return parsed

    def _parse(self, value: bytes | None) -> PaymentInitiated | Rejected:
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


def add_intake(
    topology: Topology, step: IntakeStep, topics: Topics, partitions: int, ttl_ms: int
) -> None:
    """Declare the idempotency stage on `topology`: payment.initiated and its re-keyed copy."""

    @topology.agent(
        "paysaga.intake",
        sources=[topics.initiated, topics.initiated_repartition],
        tables=[IDEMPOTENCY],
        decode=step.decode,
        event_time=lambda event: event.occurred_at,
    )
    def intake(ctx: ProcessorContext, event: PaymentInitiated) -> None:
        record = ctx.record
        assert record is not None
        scope = scope_key(event.merchant_id, event.idempotency_key).encode()
        if partition_for(scope, partitions) != ctx.partition:
            # Upstream's partitioning is not ours to trust: re-key by scope, same transaction.
            ctx.send(topics.initiated_repartition, scope, record.value, list(record.headers or ()))
            return
        table = ctx.table(IDEMPOTENCY)
        raw = table.get(scope)
        stored = None if raw is None else KeyRecord.from_json(json.loads(raw))
        fp = fingerprint(event.to_avro())
        decision, new = decide(stored, fp, event.payment_id, event.event_id,
                               event.occurred_at, ttl_ms)  # fmt: skip
        key = event.payment_id.encode()
        ctx.count(INTAKE_DECISIONS.name, decision.value.lower())
        if decision is Decision.CONFLICT:
            assert stored is not None
            ctx.emit(topics.status, STATUS, conflict_status(event, stored.payment_id), key=key)
            return
        if new is not None:
            if stored is None or stored.expires_at != new.expires_at:
                ctx.timers(EXPIRY).set(scope, new.expires_at)
            table.set(scope, compact_json(new.to_json()))
        tag = b"new" if decision is Decision.NEW else b"replay"
        ctx.send(topics.accepted, key, record.value, [(H_INTAKE, tag)])

    @intake.timer(EXPIRY, IDEMPOTENCY, PunctuationType.STREAM_TIME)
    def purge_expired_key(ctx: ProcessorContext, scope: bytes, due: int) -> None:
        """Forget a key whose lifetime ended by this partition's event time."""
        table = ctx.table(IDEMPOTENCY)
        raw = table.get(scope)
        if raw is not None and KeyRecord.from_json(json.loads(raw)).expires_at <= due:
            table.delete(scope)
