"""The saga agent: payment state, the saga's next step or compensation, and status outcomes.

Stage two of the payment topology, keyed by payment_id (the `payments` table). Its inputs:
accepted requests from intake, the gateway's lifecycle events, the inventory and shipping
services' events, and upstream's capture / refund / cancel requests. Per input it decodes
and validates (bad input: DLQ), deduplicates by event_id, lets the pure orchestrator
(`paysaga.domain.saga`) decide, and then, in the input partition's transaction: stores the
payment, sends the commands, one PaymentStatusChanged, and DLQ records for manual review.
A punctuator fires command timeouts (wall clock) and authorization expiry (event time).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiokafka.structs import ConsumerRecord
from pydantic import BaseModel, ValidationError

from paysaga.agents.intake import H_INTAKE, STATUS, IntakeStep, Rejected
from paysaga.domain.card import redact
from paysaga.domain.idempotency import fingerprint
from paysaga.domain.lifecycle import GatewayOutcome, InvalidTransition
from paysaga.domain.payment import Payment, derived_id, initiate, status_event
from paysaga.domain.saga import Command, Effects, Orchestrator, Unmatched
from paysaga.schemas import events as ev
from paysaga.schemas.codec import AvroCodec, DecodeError
from paysaga.schemas.models import validation_reason
from paysaga.streams.app.topics import Topics
from paysaga.streams.engine.core import AgentSpec, Context
from paysaga.streams.engine.partitioner import partition_for
from paysaga.tables.payments import PAYMENTS
from paysaga.tables.timers import TimerIndex, advance_stream_time, stream_time

#: Header on paysaga.saga.repartition: the topic the record was first read from.
H_SOURCE = "paysaga.source"
WALL_TIMERS = TimerIndex("command-deadline")
EVENT_TIMERS = TimerIndex("auth-expiry")
_dumps = json.JSONEncoder(separators=(",", ":")).encode


def _reversal(e: ev.PaymentReversed) -> str:
    return "VOIDED" if e.kind is ev.ReversalKind.VOID else "REFUNDED"


def _service_outcome(e: ev.InventoryEvent | ev.ShippingEvent) -> str:
    return e.outcome.value


@dataclass(frozen=True)
class Source:
    """How to read one input topic: Avro record name, edge model, the service it speaks
    for, and the orchestrator's outcome kind of one of its events (None: not an answer)."""

    schema: str
    model: type[BaseModel]
    service: str
    kind: Callable[[Any], str] | None = None


def _constant(kind: str) -> Callable[[Any], str]:
    return lambda _: kind


def _outcome(e: Any, kind: str) -> GatewayOutcome:
    """A validated lifecycle / service event as the orchestrator's outcome."""
    return GatewayOutcome(
        kind=kind,
        event_id=e.event_id,
        occurred_at=e.occurred_at,
        command_id=e.command_id,
        amount_minor=getattr(e, "amount_minor", 0),
        step=getattr(e, "step", None),
        reason=getattr(e, "reason", None) or getattr(e, "reason_code", None),
        retryable=getattr(e, "retryable", False),
    )


class SagaAgent:
    """Glue between the engine and the orchestrator for every saga input topic."""

    def __init__(
        self,
        codec: AvroCodec,
        topics: Topics,
        partitions: int,
        orchestrator: Orchestrator,
        clock: Callable[[], int] | None = None,
    ) -> None:
        self.codec = codec
        self.topics = topics
        self.partitions = partitions
        self.orch = orchestrator
        self.clock = clock or (lambda: int(time.time() * 1000))
        self.intake = IntakeStep(codec)
        t = topics
        self.sources: dict[str, Source] = {
            t.authorized: Source("PaymentAuthorized", ev.PaymentAuthorized, "payment",
                                 _constant("AUTHORIZED")),
            t.captured: Source("PaymentCaptured", ev.PaymentCaptured, "payment",
                               _constant("CAPTURED")),
            t.failed: Source("PaymentFailed", ev.PaymentFailed, "payment", _constant("FAILED")),
            t.reversed: Source("PaymentReversed", ev.PaymentReversed, "payment", _reversal),
            t.settled: Source("PaymentSettled", ev.PaymentSettled, "payment",
                              _constant("SETTLED")),
            t.inventory_events: Source("InventoryEvent", ev.InventoryEvent, "inventory",
                                       _service_outcome),
            t.shipping_events: Source("ShippingEvent", ev.ShippingEvent, "shipping",
                                      _service_outcome),
            t.requests: Source("PaymentRequest", ev.PaymentRequest, "upstream"),
        }  # fmt: skip
        self.command_topics = {"payment": t.commands, "inventory": t.inventory_commands,
                               "shipping": t.shipping_commands}  # fmt: skip

    def agents(self) -> list[AgentSpec]:
        topics = [self.topics.accepted, *self.sources, self.topics.saga_repartition]
        return [AgentSpec(f"paysaga.saga[{t}]", t, self.process, (PAYMENTS,)) for t in topics]

    # ---- per record ---------------------------------------------------------------------
    def process(self, ctx: Context, record: ConsumerRecord) -> None:
        headers = dict(record.headers or ())
        source = record.topic
        if source == self.topics.saga_repartition:
            source = headers.get(H_SOURCE, b"").decode()
        event = self._parse(ctx, source, record.value)
        if event is None:
            return
        key = event.payment_id.encode()
        if partition_for(key, self.partitions) != ctx.partition:
            hdrs = [h for h in record.headers or () if h[0] != H_SOURCE]
            hdrs.append((H_SOURCE, source.encode()))
            ctx.send(self.topics.saga_repartition, key, record.value, hdrs)
            return
        payments = ctx.table(PAYMENTS)
        advance_stream_time(payments, event.occurred_at)
        raw = payments.get(key)
        current = None if raw is None else Payment.from_table(json.loads(raw))
        if source == self.topics.accepted:
            self._accepted(ctx, event, current, headers.get(H_INTAKE) == b"replay")
        elif current is None:
            ctx.dead_letter("transition", f"no payment {event.payment_id} for this event",
                            self.topics.dlq)  # fmt: skip
        elif current.seen(event.event_id):
            return  # a duplicate delivery: applied once already (dedup by event_id)
        elif source == self.topics.requests:
            self._request(ctx, event, current)
        else:
            self._answer(ctx, event, current, self.sources[source])

    def _parse(self, ctx: Context, source: str, value: bytes | None) -> Any:
        if source == self.topics.accepted:
            parsed = self.intake.parse(value)
            if isinstance(parsed, Rejected):
                ctx.dead_letter(parsed.kind, parsed.reason, self.topics.dlq)
                return None
            return parsed
        spec = self.sources.get(source)
        if spec is None:
            ctx.dead_letter("decode", f"unknown saga source topic {source!r}", self.topics.dlq)
            return None
        if value is None:
            ctx.dead_letter("decode", f"empty record value (tombstone) on {source}",
                            self.topics.dlq)  # fmt: skip
            return None
        try:
            return spec.model.model_validate(self.codec.decode(value, spec.schema))
        except DecodeError as exc:
            ctx.dead_letter("decode", f"{exc.reason}: {exc}", self.topics.dlq)
        except ValidationError as exc:
            ctx.dead_letter("validation", validation_reason(exc), self.topics.dlq)
        return None

    def _accepted(self, ctx: Context, event: Any, current: Payment | None, replay: bool) -> None:
        if current is not None or replay:
            if current is None:
                ctx.dead_letter("transition", "replay of a payment that does not exist",
                                self.topics.dlq)  # fmt: skip
                return
            status = status_event(current, cause_event_id=event.event_id,
                                  occurred_at=event.occurred_at,
                                  previous=current.status.value, replay=True)  # fmt: skip
            self._send_status(ctx, current, status)
            return
        payment = initiate(event)
        effects = self.orch.start(payment, event.saga.value, self.clock())
        self._commit(ctx, payment, effects, event.event_id, event.occurred_at, None)

    def _answer(self, ctx: Context, event: Any, current: Payment, source: Source) -> None:
        assert source.kind is not None
        outcome = _outcome(event, source.kind(event))
        try:
            payment, effects = self.orch.on_outcome(current, source.service, outcome,
                                                    self.clock())  # fmt: skip
        except (Unmatched, InvalidTransition) as exc:
            self._reject(ctx, current, event, str(exc))
            return
        payment.record(event.event_id, type(event).__name__, event.occurred_at)
        self._commit(ctx, payment, effects, event.event_id, event.occurred_at,
                     current.status.value)  # fmt: skip

    def _request(self, ctx: Context, event: ev.PaymentRequest, current: Payment) -> None:
        if event.merchant_id != current.merchant_id:
            self._reject(ctx, current, event, "request from another merchant")
            return
        if event.currency is not None and event.currency != current.currency:
            self._reject(ctx, current, event, f"currency {event.currency} is not the payment's")
            return
        payment = current.model_copy(deep=True)
        fp = fingerprint(event.model_dump(mode="json"))
        now = self.clock()
        kind = event.request_type
        if kind is ev.RequestType.CAPTURE:
            eff = self.orch.request_capture(payment, event.idempotency_key, fp, event.amount_minor,
                                            now)  # fmt: skip
        elif kind is ev.RequestType.CANCEL:
            eff = self.orch.request_cancel(payment, event.idempotency_key, fp, now)
        else:
            eff = self.orch.request_refund(payment, event.idempotency_key, fp, event.amount_minor,
                                           now)  # fmt: skip
        if eff.rejected:
            self._reject(ctx, current, event, eff.rejected)
            return
        if eff.replay or eff.conflict:
            status = status_event(
                current, cause_event_id=event.event_id, occurred_at=event.occurred_at,
                previous=current.status.value, replay=eff.replay, reason=eff.conflict,
                status="IDEMPOTENCY_CONFLICT" if eff.conflict else None, step=eff.step,
            )  # fmt: skip
            self._send_status(ctx, current, status)
            return
        payment.record(event.event_id, f"{kind.value.title()}Requested", event.occurred_at)
        self._commit(ctx, payment, eff, event.event_id, event.occurred_at, current.status.value)

    def _reject(self, ctx: Context, current: Payment, event: Any, reason: str) -> None:
        """Refused input: a REJECTED status for upstream, the record to the DLQ, no change.

        The money state is untouched; only the event id is remembered, so a redelivery of
        the same refused event (services are at-least-once) is not reported twice.
        """
        reason = redact(reason)
        marked = current.model_copy(deep=True)
        marked.record(event.event_id, f"Rejected{type(event).__name__}", event.occurred_at)
        self._store(ctx, marked)
        status = status_event(marked, cause_event_id=event.event_id,
                              occurred_at=event.occurred_at, previous=current.status.value,
                              status="REJECTED", reason=reason, role="rejected")  # fmt: skip
        self._send_status(ctx, marked, status)
        ctx.dead_letter("transition", reason, self.topics.dlq)

    # ---- writing the outcome ------------------------------------------------------------
    def _store(self, ctx: Context, p: Payment) -> None:
        """Write the payment, moving its timer index entries to its current deadlines."""
        key = p.payment_id.encode()
        payments = ctx.table(PAYMENTS)
        wall, event = self.orch.next_deadline(p), self.orch.expiry_due(p)
        WALL_TIMERS.move(payments, key, p.timer_wall, wall)
        EVENT_TIMERS.move(payments, key, p.timer_event, event)
        p.timer_wall, p.timer_event = wall, event
        payments.set(key, _dumps(p.to_table()).encode())

    def _commit(self, ctx: Context, p: Payment, eff: Effects, cause: str, occurred_at: int,
                previous: str | None) -> None:  # fmt: skip
        """Store the payment and send what the input caused: commands, one status, reviews."""
        self._store(ctx, p)
        key = p.payment_id.encode()
        for command in eff.commands:
            topic = self.command_topics[command.service]
            record = self._command(p, command, cause, occurred_at)
            ctx.send(topic, key, self.codec.encode(record[0], record[1]))
        reason = "; ".join(eff.notes) or None
        status = status_event(p, cause_event_id=cause, occurred_at=occurred_at,
                              previous=previous, reason=reason and reason[:1000],
                              terminal=eff.terminal, step=eff.step)  # fmt: skip
        self._send_status(ctx, p, status)
        for why in eff.review:
            ctx.review("saga", why, self.topics.dlq, key, _review_value(p), PAYMENTS)

    def _send_status(self, ctx: Context, p: Payment, status: dict[str, Any]) -> None:
        ctx.send(self.topics.status, p.payment_id.encode(), self.codec.encode(STATUS, status))

    def _command(self, p: Payment, c: Command, cause: str, occurred_at: int) -> tuple[str, dict]:
        envelope = {
            "event_id": c.command_id, "occurred_at": occurred_at, "payment_id": p.payment_id,
            "correlation_id": p.order_id, "causation_id": cause, "command_id": c.command_id,
            "idempotency_key": c.idempotency_key,
        }  # fmt: skip
        if c.service == "payment":
            return "PaymentCommand", {
                **envelope, "command_type": c.action, "amount_minor": c.amount_minor,
                "currency": p.currency, "merchant_id": p.merchant_id,
                "card_token": p.card_token, "attempt": c.attempt,
            }  # fmt: skip
        if c.service == "inventory":
            items = [{"sku": i.sku, "quantity": i.quantity} for i in p.items]
            return "InventoryCommand", {**envelope, "command_type": c.action,
                                        "order_id": p.order_id, "items": items}  # fmt: skip
        return "ShippingCommand", {**envelope, "command_type": c.action, "order_id": p.order_id,
                                   "address_country": p.shipping_country}  # fmt: skip

    # ---- timers -------------------------------------------------------------------------
    def punctuate(self, ctx: Context, now_ms: int) -> None:
        """Fire overdue command deadlines (wall clock) and expired authorizations (event
        time); each fired timer is one state change with its own deterministic ids."""
        payments = ctx.table(PAYMENTS)
        for due, key in WALL_TIMERS.due(payments, now_ms):
            self._fire(ctx, key, due, "timeout", lambda p: self.orch.on_timeout(p, now_ms))
        upto = stream_time(payments)
        for due, key in EVENT_TIMERS.due(payments, upto):
            self._fire(ctx, key, due, "expiry",
                       lambda p: self.orch.on_auth_expiry(p, upto, now_ms))  # fmt: skip

    def _fire(self, ctx: Context, key: bytes, due: int, kind: str,
              run: Callable[[Payment], Effects]) -> None:  # fmt: skip
        payments = ctx.table(PAYMENTS)
        index = WALL_TIMERS if kind == "timeout" else EVENT_TIMERS
        raw = payments.get(key)
        current = None if raw is None else Payment.from_table(json.loads(raw))
        indexed = None if current is None else (
            current.timer_wall if kind == "timeout" else current.timer_event)  # fmt: skip
        if current is None or indexed != due:
            index.move(payments, key, due, None)  # stale entry: the payment moved on
            return
        previous, version, updated_at = current.status.value, current.version, current.updated_at
        effects = run(current)
        if not effects.changed:  # nothing was due after all: just re-arm the timers
            self._store(ctx, current)
            return
        cause = derived_id(current.payment_id, kind, str(due), str(version))
        current.version += 1
        self._commit(ctx, current, effects, cause, max(due, updated_at), previous)


def _review_value(p: Payment) -> bytes:
    """What an operator needs to review a saga: the payment record without the card token."""
    body = p.to_table()
    body.pop("card_token", None)
    return _dumps(body).encode()
