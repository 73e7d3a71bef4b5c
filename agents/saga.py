"""The saga agent: payment state, the saga's next step or compensation, and status outcomes.

Stage two of the payment topology, keyed by payment_id (the `payments` table). Its inputs:
accepted requests from intake, the gateway's lifecycle events, the inventory and shipping
services' events, and upstream's capture / refund / cancel requests. The engine decodes
and validates each with `SagaAgent.decode` (bad input: DLQ); `process` deduplicates by
event_id, lets the pure orchestrator (`paysaga.domain.saga`) decide, and then, in the input
partition's transaction: stores the payment, emits the commands, one PaymentStatusChanged,
and DLQ records for manual review. Two durable timers: command deadlines (wall clock) and
authorization expiry (stream time).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiokafka.structs import ConsumerRecord
from pydantic import BaseModel, ValidationError

from paysaga.agents import metrics as m
from paysaga.agents.intake import H_INTAKE, IntakeStep, Rejected
from paysaga.agents.outputs import (
    BREAKER_TRANSITION,
    COMMAND_SCHEMAS,
    RESUME,
    RETRY,
    STATUS,
    breaker_record,
    command_record,
    compact_json,
    resume_record,
    retry_record,
)
from paysaga.agents.rekey import forward, source_of
from paysaga.domain.breaker import Breaker, BreakerConfig, BreakerState, Transition
from paysaga.domain.card import redact
from paysaga.domain.idempotency import fingerprint
from paysaga.domain.lifecycle import GatewayOutcome, InvalidTransition
from paysaga.domain.payment import Payment, derived_id, initiate, status_event
from paysaga.domain.retry import answer_result
from paysaga.domain.saga import Command, Effects, Orchestrator, Review, Unmatched
from paysaga.schemas import events as ev
from paysaga.schemas.codec import AvroCodec, DecodeError
from paysaga.schemas.decoding import EdgeDecoder
from paysaga.schemas.models import validation_reason
from paysaga.streams.app.topics import Topics
from paysaga.streams.engine import BadRecord, ProcessorContext, PunctuationType, Topology
from paysaga.streams.engine.deadletter import REDRIVE_PREFIX
from paysaga.streams.engine.partitioner import partition_for
from paysaga.tables.breaker import BREAKER, GATEWAY, BreakerStore
from paysaga.tables.experiments import (
    EXPERIMENTS,
    record_outcome,
    record_start,
    withdraw_outcome,
)
from paysaga.tables.payments import PAYMENTS, PaymentCache
from paysaga.tables.transaction import TableTransaction

#: Durable per-payment timers: unanswered commands (wall clock), uncaptured authorizations
#: (event time, so a replay voids exactly the same ones).
COMMAND_DEADLINE = "command-deadline"
AUTH_EXPIRY = "auth-expiry"
#: The task's circuit breaker: its wait in the open state, and releasing what it held.
BREAKER_TICK = "breaker-tick"
#: Held payments released per wall-clock punctuation once the breaker closed.
RELEASE_PAGE = 500

log = logging.getLogger(__name__)


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
    """A validated lifecycle / service event as the orchestrator's outcome. Fields one
    event type lacks are read from the model's own dict: a missing attribute on a pydantic
    model costs a raised and caught AttributeError."""
    f = e.__dict__
    return GatewayOutcome(
        kind=kind,
        event_id=e.event_id,
        occurred_at=e.occurred_at,
        command_id=e.command_id,
        amount_minor=f.get("amount_minor", 0),
        step=f.get("step"),
        reason=f.get("reason") or f.get("reason_code"),
        code=f.get("reason_code"),
        retryable=f.get("retryable", False),
    )


class SagaAgent:
    """Glue between the engine and the orchestrator for every saga input topic."""

    def __init__(
        self,
        codec: AvroCodec,
        topics: Topics,
        partitions: int,
        orchestrator: Orchestrator,
        intake: IntakeStep | None = None,
        edge: EdgeDecoder | None = None,
        breaker: BreakerConfig | None = None,
    ) -> None:
        self.codec = codec
        self.topics = topics
        self.partitions = partitions
        self.orch = orchestrator
        #: Shared with the intake agent, so an accepted record is not decoded again.
        self.intake = intake or IntakeStep(codec)
        #: Shared with reconciliation, which reads payment.captured too.
        self.edge = edge or EdgeDecoder(codec)
        self.payments = PaymentCache()
        #: Each task's circuit breaker on the gateway (docs/retries.md#the-circuit-breaker).
        self.breakers = BreakerStore(breaker or BreakerConfig())
        self._breaker_spec = self.breakers.config.spec()
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
            t.saga_resume: Source("SagaResume", ev.SagaResume, "operator"),
        }  # fmt: skip
        self.command_topics = {"payment": t.commands, "inventory": t.inventory_commands,
                               "shipping": t.shipping_commands}  # fmt: skip

    def add_to(self, topology: Topology) -> None:
        """Declare the saga agent, its two timers and its sources on `topology`."""
        sources = [self.topics.accepted, *self.sources, self.topics.saga_repartition]
        agent = topology.agent(
            "paysaga.saga",
            sources=sources,
            tables=[PAYMENTS, EXPERIMENTS, BREAKER],
            decode=self.decode,
            event_time=lambda v: v[1].occurred_at,
        )
        saga = agent(self.process)
        saga.timer(COMMAND_DEADLINE, PAYMENTS, PunctuationType.WALL_CLOCK)(self._timeout)
        saga.timer(AUTH_EXPIRY, PAYMENTS, PunctuationType.STREAM_TIME)(self._expiry)
        saga.timer(BREAKER_TICK, BREAKER, PunctuationType.WALL_CLOCK)(self._breaker_tick)

    # ---- per record ---------------------------------------------------------------------
    def decode(self, record: ConsumerRecord) -> tuple[str, Any]:
        """(source topic, validated event); the source of a repartitioned record is the
        topic it was first read from. Bad input raises `BadRecord` (to the DLQ)."""
        source = source_of(record, self.topics.saga_repartition)
        value = record.value
        if source == self.topics.accepted:
            parsed = self.intake.parse(value, last=True)
            if isinstance(parsed, Rejected):
                raise BadRecord(parsed.kind, parsed.reason)
            return source, parsed
        spec = self.sources.get(source)
        if spec is None:
            raise BadRecord("decode", f"unknown saga source topic {source!r}")
        if value is None:
            raise BadRecord("decode", f"empty record value (tombstone) on {source}")
        try:
            return source, self.edge.decode(value, spec.schema, spec.model)
        except DecodeError as exc:
            raise BadRecord("decode", f"{exc.reason}: {exc}") from exc
        except ValidationError as exc:
            raise BadRecord("validation", validation_reason(exc)) from exc

    def process(self, ctx: ProcessorContext, value: tuple[str, Any]) -> None:
        source, event = value
        record = ctx.record
        assert record is not None
        key = event.payment_id.encode()
        if partition_for(key, self.partitions) != ctx.partition:
            forward(ctx, self.topics.saga_repartition, key, source)
            return
        current = self.payments.load(ctx.table(PAYMENTS), key)
        if source == self.topics.accepted:
            replay = dict(record.headers or ()).get(H_INTAKE) == b"replay"
            self._accepted(ctx, event, current, replay)
        elif current is None:
            ctx.dead_letter("transition", f"no payment {event.payment_id} for this event")
        elif source == self.topics.saga_resume:
            self._resume(ctx, event, current)
        elif current.seen(event.event_id):
            return  # a duplicate delivery: applied once already (dedup by event_id)
        elif source == self.topics.requests:
            self._request(ctx, event, current)
        else:
            self._answer(ctx, event, current, self.sources[source])

    def _accepted(
        self, ctx: ProcessorContext, event: Any, current: Payment | None, replay: bool
    ) -> None:
        if current is not None or replay:
            if current is None:
                ctx.dead_letter("transition", "replay of a payment that does not exist")
                return
            status = status_event(current, cause_event_id=event.event_id,
                                  occurred_at=event.occurred_at,
                                  previous=current.status.value, replay=True)  # fmt: skip
            self._send_status(ctx, current, status)
            return
        payment = initiate(event)
        effects = self.orch.start(payment, event.saga.value, ctx.wall_clock_ms())
        variant = payment.retry_variant or "NONE"
        ctx.count(m.PAYMENTS_STARTED.name, event.saga.value, variant)
        record_start(ctx.table(EXPERIMENTS), variant)
        self._commit(ctx, payment, effects, event.event_id, event.occurred_at, None)

    def _answer(self, ctx: ProcessorContext, event: Any, current: Payment, source: Source) -> None:
        assert source.kind is not None
        outcome = _outcome(event, source.kind(event))
        previous = current.status.value
        try:  # in place: a refused outcome leaves `current` as it was
            payment, effects = self.orch.on_outcome(current, source.service, outcome,
                                                    ctx.wall_clock_ms())  # fmt: skip
        except (Unmatched, InvalidTransition) as exc:
            self._reject(ctx, current, event, str(exc))
            return
        payment.record(event.event_id, type(event).__name__, event.occurred_at)
        if effects.call_ok is not None:  # it answered the gateway call awaited now
            self._record_calls(ctx, (effects.call_ok,))
        if source.service == "payment":
            self._count_answer(ctx, payment, outcome, previous)
        self._commit(ctx, payment, effects, event.event_id, event.occurred_at, previous)

    @staticmethod
    def _count_answer(ctx: ProcessorContext, p: Payment, outcome: GatewayOutcome,
                      previous: str) -> None:  # fmt: skip
        """The gateway's applied answer, for the decline and error rates and the latencies
        from request to authorization and from capture to settlement (event time)."""
        kind = outcome.kind
        result = answer_result(kind, outcome.retryable, outcome.code)
        ctx.count(m.GATEWAY_ANSWERS.name, *m.answer_labels(kind, outcome.step, result))
        if p.status.value == previous:
            return
        if kind == "AUTHORIZED":
            ctx.observe(m.REQUEST_TO_AUTHORIZED.name, (outcome.occurred_at - p.created_at) / 1000)
        elif kind == "SETTLED" and p.captured_at is not None:
            ctx.observe(m.SETTLEMENT_LAG.name, (outcome.occurred_at - p.captured_at) / 1000)

    def _request(self, ctx: ProcessorContext, event: ev.PaymentRequest, current: Payment) -> None:
        if event.merchant_id != current.merchant_id:
            self._reject(ctx, current, event, "request from another merchant")
            return
        if event.currency is not None and event.currency != current.currency:
            self._reject(ctx, current, event, f"currency {event.currency} is not the payment's")
            return
        # In place: a refusal, a replay or a conflict is decided before anything changes.
        payment, previous = current, current.status.value
        fp = fingerprint(event.model_dump(mode="json"))
        now = ctx.wall_clock_ms()
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
            self._reject(ctx, payment, event, eff.rejected)
            return
        if eff.replay or eff.conflict:
            status = status_event(
                payment, cause_event_id=event.event_id, occurred_at=event.occurred_at,
                previous=previous, replay=eff.replay, reason=eff.conflict,
                status="IDEMPOTENCY_CONFLICT" if eff.conflict else None, step=eff.step,
            )  # fmt: skip
            self._send_status(ctx, payment, status)
            return
        payment.record(event.event_id, f"{kind.value.title()}Requested", event.occurred_at)
        self._commit(ctx, payment, eff, event.event_id, event.occurred_at, previous)

    def _resume(self, ctx: ProcessorContext, event: ev.SagaResume, current: Payment) -> None:
        """An operator's resume (a redriven review letter, docs/dlq.md#resuming-a-review).
        Applied once: a resume of a doubt already resumed or answered changes nothing and
        says so in a replay status (never silently dropped, never a new dead letter, which
        a redrive would send round again)."""
        record = ctx.record
        assert record is not None
        redrive = {k: v.decode("utf-8", "replace") for k, v in record.headers or ()
                   if k.startswith(REDRIVE_PREFIX)}  # fmt: skip
        previous = current.status.value
        eff = self.orch.resume(current, event.idempotency_key, event.attempt, event.inquiries,
                               ctx.wall_clock_ms(), redrive)  # fmt: skip
        if eff.replay:
            status = status_event(current, cause_event_id=event.event_id,
                                  occurred_at=event.occurred_at, previous=previous,
                                  replay=True, reason=eff.notes[0], step=event.step)  # fmt: skip
            self._send_status(ctx, current, status)
            return
        current.record(event.event_id, "SagaResumed", event.occurred_at)
        self._commit(ctx, current, eff, event.event_id, event.occurred_at, previous)

    def _reject(self, ctx: ProcessorContext, current: Payment, event: Any, reason: str) -> None:
        """Refused input: a REJECTED status for upstream, the record to the DLQ, no change.

        The money state is untouched; only the event id is remembered, so a redelivery of
        the same refused event (services are at-least-once) is not reported twice.
        """
        reason, previous = redact(reason), current.status.value
        marked = current  # the caller's own copy, read for this input: no other reader
        marked.record(event.event_id, f"Rejected{type(event).__name__}", event.occurred_at)
        self._store(ctx, marked)
        status = status_event(marked, cause_event_id=event.event_id,
                              occurred_at=event.occurred_at, previous=previous,
                              status="REJECTED", reason=reason, role="rejected")  # fmt: skip
        self._send_status(ctx, marked, status)
        ctx.dead_letter("transition", reason)

    # ---- writing the outcome ------------------------------------------------------------
    def _store(self, ctx: ProcessorContext, p: Payment) -> None:
        """Write the payment, moving its timers to its current deadlines. The payment
        remembers what is armed (`timer_wall`, `timer_event`), so an unchanged deadline
        costs no read of the timer index.

        The command deadline only ever moves earlier while commands are outstanding: each
        step sends a command with a later deadline, and moving the timer costs three
        changelog records per step of every payment. A timer that fires before the current
        deadline finds nothing overdue and is armed again at it (`_fire`), an extra firing
        only for a payment slower than the command timeout (docs/architecture.md#timers).
        """
        key = p.payment_id.encode()
        wall, event = self.orch.next_deadline(p), self.orch.expiry_due(p)
        if wall is not None and p.timer_wall is not None and p.timer_wall < wall:
            wall = p.timer_wall
        for name, armed, due in ((COMMAND_DEADLINE, p.timer_wall, wall),
                                 (AUTH_EXPIRY, p.timer_event, event)):  # fmt: skip
            if armed != due:
                timers = ctx.timers(name)
                if due is None:
                    timers.cancel(key)
                else:
                    timers.set(key, due)
        p.timer_wall, p.timer_event = wall, event
        held = self.orch.held(p) > 0
        if held != (p.held_at is not None):  # into or out of the breaker's held index
            table = ctx.table(BREAKER)
            if held:
                p.held_at = ctx.wall_clock_ms()
                self.breakers.hold(table, key, p.held_at)
            else:
                p.held_at = None
                self.breakers.release(table, key)
        self.payments.store(ctx.table(PAYMENTS), key, p)

    def _commit(self, ctx: ProcessorContext, p: Payment, eff: Effects, cause: str, occurred_at: int,
                previous: str | None, sent_at: int | None = None,
                releasing: bool = False) -> None:  # fmt: skip
        """Store the payment and send what the input caused: commands, retries scheduled,
        one status, reviews. `sent_at`: the wall clock a timer sends its commands at (their
        record timestamp, so a retry's send time is in Kafka, docs/retries.md)."""
        gated = [c for c in eff.commands if self.orch.gateway_call(c)]
        if gated:  # the breaker decides at the send time the records will carry
            now = ctx.wall_clock_ms() if sent_at is None else sent_at
            self._gate(ctx, p, eff, gated, now, releasing)
        self._count(ctx, p, eff, occurred_at)
        self._store(ctx, p)
        key = p.payment_id.encode()
        for command in eff.commands:
            topic = self.command_topics[command.service]
            fields = command_record(p, command, cause, occurred_at)
            ctx.emit(topic, COMMAND_SCHEMAS[command.service], fields, key=key, timestamp=sent_at)
            ctx.count(m.COMMANDS_SENT.name, command.service, command.action)
            if command.attempt > 1 and command.action != "INQUIRE":  # sent again
                ctx.count(m.SAGA_RETRIES.name, p.retry_variant or "NONE")
        for retry in eff.retries:
            ctx.emit(self.topics.retry(retry.level), RETRY,
                     retry_record(p, retry, cause, occurred_at), key=key)  # fmt: skip
            ctx.count(m.RETRIES_SCHEDULED.name, str(retry.level), retry.variant,
                      retry.error_class.value)  # fmt: skip
        if eff.settlement is not None:  # to the merchant's batch (docs/settlement.md)
            fields = command_record(p, eff.settlement, cause, occurred_at)
            ctx.emit(self.topics.settlement_requests, COMMAND_SCHEMAS["payment"], fields,
                     key=p.merchant_id.encode())  # fmt: skip
        reason = "; ".join(eff.notes) or None
        status = status_event(p, cause_event_id=cause, occurred_at=occurred_at,
                              previous=previous, reason=reason and reason[:1000],
                              terminal=eff.terminal, step=eff.step)  # fmt: skip
        self._send_status(ctx, p, status)
        for review in eff.review:
            self._review(ctx, p, review, eff.review_class.value, cause, occurred_at)

    def _count(self, ctx: ProcessorContext, p: Payment, eff: Effects, occurred_at: int) -> None:
        """The A/B retry experiment counts each saga once, at its end: an IN_DOUBT saga
        taken up again gives its count back, and is counted when it ends for good."""
        table, variant = ctx.table(EXPERIMENTS), p.retry_variant or "NONE"
        if eff.reopened and p.counted is not None:
            withdraw_outcome(table, variant, False, *p.counted)
            p.counted = None
            ctx.count(m.SAGAS_REOPENED.name, variant)
        if eff.terminal and p.saga is not None:
            p.counted = [p.retries, occurred_at - p.created_at]
            record_outcome(table, variant, p.saga.state == "COMPLETED", *p.counted)
            ctx.count(m.SAGAS_ENDED.name, p.saga.kind, p.saga.state, variant)

    def _review(self, ctx: ProcessorContext, p: Payment, review: Review, error_class: str,
                cause: str, occurred_at: int) -> None:  # fmt: skip
        """One review letter. For a command given up and kept in doubt, the letter's value
        is the SagaResume that takes it up again, so `paysaga dlq redrive` can resume it;
        otherwise the payment record, for a human (docs/dlq.md#resuming-a-review)."""
        key = p.payment_id.encode()
        doubt = p.doubts.get(review.doubt) if review.doubt else None
        if doubt is None:
            ctx.review("saga", review.reason, key, _review_value(p), PAYMENTS,
                       error_class=error_class)  # fmt: skip
            return
        fields = resume_record(p, doubt, cause, occurred_at, error_class, review.reason)
        history = tuple((k, v.encode()) for k, v in doubt.redrive.items())
        ctx.review("saga", review.reason, key, self.codec.encode(RESUME, fields), PAYMENTS,
                   error_class=error_class, resume_topic=self.topics.saga_resume,
                   history=history)  # fmt: skip

    def _send_status(self, ctx: ProcessorContext, p: Payment, status: dict[str, Any]) -> None:
        ctx.emit(self.topics.status, STATUS, status, key=p.payment_id.encode())

    # ---- timers -------------------------------------------------------------------------
    def _timeout(self, ctx: ProcessorContext, key: bytes, due: int) -> None:
        """An unanswered command's deadline passed (wall clock): retry it or give up."""
        now = ctx.wall_clock_ms()
        self._fire(ctx, key, due, "timeout", lambda p: self.orch.on_timeout(p, now), sent_at=now)

    def _expiry(self, ctx: ProcessorContext, key: bytes, due: int) -> None:
        """An uncaptured authorization's window ended by the partition's event time."""
        upto = ctx.stream_time
        self._fire(ctx, key, due, "expiry",
                   lambda p: self.orch.on_auth_expiry(p, upto, ctx.wall_clock_ms()))  # fmt: skip

    def _fire(self, ctx: ProcessorContext, key: bytes, due: int, kind: str,
              run: Callable[[Payment], Effects], sent_at: int | None = None) -> None:  # fmt: skip
        """One fired timer: one state change with its own deterministic ids."""
        current = self.payments.load(ctx.table(PAYMENTS), key)
        if current is None:
            return
        # The engine removed the fired timer: what the payment says is armed must agree,
        # so `_store` arms whatever is due next.
        if kind == "timeout":
            if current.timer_wall != due:
                return
            current.timer_wall = None
        else:
            if current.timer_event != due:
                return
            current.timer_event = None
        previous, version, updated_at = current.status.value, current.version, current.updated_at
        effects = run(current)
        if not effects.changed:  # nothing was due after all: just re-arm the timers
            self._store(ctx, current)
            return
        cause = derived_id(current.payment_id, kind, str(due), str(version))
        current.version += 1
        self._commit(ctx, current, effects, cause, max(due, updated_at), previous, sent_at)

    # ---- the circuit breaker (docs/retries.md#the-circuit-breaker) ----------------------
    def _gate(self, ctx: ProcessorContext, p: Payment, eff: Effects, gated: list[Command],
              now: int, releasing: bool) -> None:  # fmt: skip
        """Ask the task's breaker about each gateway call of `eff`; hold the refused ones.
        Half open, the trial permits go to the payments held longest: a new call waits
        behind them (`releasing`: this is one of them, let out by the breaker's timer)."""
        table = ctx.table(BREAKER)
        if self.breakers.closed(table, ctx.partition):
            return  # the common case: every call goes out, nothing to write
        b, seq = self.breakers.load(table, ctx.partition)
        held, before = [], seq
        queue = not releasing and self.breakers.held(table) > 0
        for c in gated:
            seq = self._transitioned(ctx, table, b, seq, b.tick(now))
            if queue and b.state is BreakerState.HALF_OPEN:
                held.append(c)  # behind the held ones, which the timer lets out first
                continue
            allowed, moved = b.allow(now)
            seq = self._transitioned(ctx, table, b, seq, moved)
            if not allowed:
                held.append(c)
        if seq != before or b.state is BreakerState.HALF_OPEN:  # open and refusing: no write
            self.breakers.store(table, ctx.partition, b, seq)
        if held:
            self.orch.hold(p, eff, held)

    def _record_calls(self, ctx: ProcessorContext, outcomes: tuple[bool, ...]) -> None:
        """Outcomes of gateway calls (True: the gateway worked; False: it said it could not).

        Silence is not counted: past its deadline, an answer may be waiting unread in this
        worker's own input (a worker behind its input would open every task's breaker, as
        `make bench`'s backlog did when timeouts counted). A silent gateway is still met by
        inquiries and backoff, and a silent trial call by the half-open max wait."""
        table = ctx.table(BREAKER)
        b, seq = self.breakers.load(table, ctx.partition)
        if b.state is BreakerState.OPEN:
            return  # an answer to a call let through before it opened: not counted
        now = ctx.wall_clock_ms()
        for ok in outcomes:
            seq = self._transitioned(ctx, table, b, seq, b.record(ok, now))
        self.breakers.store(table, ctx.partition, b, seq)

    def _transitioned(self, ctx: ProcessorContext, table: TableTransaction, b: Breaker, seq: int,
                      t: Transition | None) -> int:  # fmt: skip
        """One transition: its record on paysaga.breaker, and the breaker's timer set to
        what comes next (the end of the wait, or releasing what is held)."""
        if t is None:
            return seq
        seq += 1
        held = self.breakers.held(table)
        ctx.count(m.BREAKER_TRANSITIONS.name, t.to_state.value)
        log.warning("task %d: gateway breaker %s -> %s (%s); %d payments held", ctx.partition,
                    t.from_state.value, t.to_state.value, t.reason, held)  # fmt: skip
        ctx.emit(self.topics.breaker, BREAKER_TRANSITION,
                 breaker_record(t, ctx.partition, seq, held, self._breaker_spec),
                 key=b"%d" % ctx.partition, timestamp=t.at_ms)  # fmt: skip
        self._arm_breaker(ctx, b, held, t.at_ms)
        return seq

    def _arm_breaker(self, ctx: ProcessorContext, b: Breaker, held: int, now: int) -> None:
        timers = ctx.timers(BREAKER_TICK)
        change = b.next_change_ms()  # the end of the wait, or of a half-open trial's max wait
        if held and (b.state is BreakerState.CLOSED or b.half_open_free()):
            timers.set(GATEWAY, now)  # release at the next punctuation
        elif change is not None:
            timers.set(GATEWAY, change)
        else:
            timers.cancel(GATEWAY)

    def _breaker_tick(self, ctx: ProcessorContext, key: bytes, due: int) -> None:
        """The breaker's timer: end the wait in the open state, and release held payments,
        the oldest first (a page per punctuation when closed; half open, as many as it
        permits). Each release goes out through the breaker like any call."""
        table = ctx.table(BREAKER)
        now = ctx.wall_clock_ms()
        b, seq = self.breakers.load(table, ctx.partition)
        seq = self._transitioned(ctx, table, b, seq, b.tick(now))
        self.breakers.store(table, ctx.partition, b, seq)
        budget = RELEASE_PAGE if b.state is BreakerState.CLOSED else b.half_open_free()
        for held in self.breakers.oldest(table, budget):
            self._release(ctx, held, now)
        b, _ = self.breakers.load(table, ctx.partition)
        self._arm_breaker(ctx, b, self.breakers.held(table), now + 1)

    def _release(self, ctx: ProcessorContext, key: bytes, now: int) -> None:
        current = self.payments.load(ctx.table(PAYMENTS), key)
        if current is None or not self.orch.held(current):
            self.breakers.release(ctx.table(BREAKER), key)  # answered or ended meanwhile
            if current is not None:
                current.held_at = None
                self.payments.store(ctx.table(PAYMENTS), key, current)
            return
        previous, version = current.status.value, current.version
        effects = self.orch.release(current, now)
        cause = derived_id(current.payment_id, "release", str(version))
        current.version += 1
        self._commit(ctx, current, effects, cause, max(now, current.updated_at), previous, now,
                     releasing=True)  # fmt: skip


def _review_value(p: Payment) -> bytes:
    """What an operator needs to review a saga: the payment record without the card token."""
    body = p.to_table()
    body.pop("card_token", None)
    return compact_json(body)
