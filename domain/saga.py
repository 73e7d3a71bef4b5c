"""Declarative sagas and the orchestrator that runs them over a payment record.

A saga is an ordered list of `Step`s (Eventuate's step / action / compensation): each names
its service, the command that performs it, the outcome that completes it, the outcome that
fails it, and the command that undoes it. The orchestrator is pure: given a payment and an
input (a service outcome, an upstream request, a timer) it changes the payment record and
returns the commands to send; the agent sends them in the same Kafka transaction that
stores the record, so a step's state change and its command commit together (a
read-call-write capture is exactly what this avoids: docs/traps.md#read-call-write-is-not-atomic).

Commands carry deterministic ids: the idempotency key is (payment, step, role) and stays the
same across retries, as Stripe requires (a retried authorization must not authorize twice);
the command id adds the attempt, so every send is distinguishable and a downstream service
can dedup a command seen twice.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from paysaga.domain.lifecycle import (
    GatewayOutcome,
    InvalidTransition,
    apply_transition,
    cancel_if_no_money_moved,
)
from paysaga.domain.payment import (
    TERMINAL_SAGA_STATES,
    Outstanding,
    Payment,
    PaymentStatus,
    RefundRequest,
    SagaState,
    derived_id,
)
from paysaga.domain.retry import (
    INQUIRY_STEP,
    NEVER_SEEN,
    ErrorClass,
    RetryPolicy,
    classify,
    gateway_failed,
)
from paysaga.domain.settlement import SettlementPolicy

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class Step:
    """One saga step: do `action` on `service`; `compensation` undoes it."""

    name: str
    service: str  # payment | inventory | shipping
    action: str
    success: str
    failure: str
    compensation: str
    compensated: str


@dataclass(frozen=True)
class SagaDefinition:
    name: str
    steps: tuple[Step, ...]

    def index(self, name: str) -> int:
        return next(i for i, s in enumerate(self.steps) if s.name == name)


RESERVE = Step("reserve_inventory", "inventory", "RESERVE", "RESERVED", "RESERVATION_FAILED",
               "RELEASE", "RELEASED")  # fmt: skip
AUTHORIZE = Step("authorize", "payment", "AUTHORIZE", "AUTHORIZED", "FAILED", "VOID", "VOIDED")
CAPTURE = Step("capture", "payment", "CAPTURE", "CAPTURED", "FAILED", "REFUND", "REFUNDED")
SHIP = Step("create_shipment", "shipping", "CREATE_SHIPMENT", "CREATED", "CREATION_FAILED",
            "CANCEL_SHIPMENT", "CANCELLED")  # fmt: skip

PAYMENT_SAGA = SagaDefinition("PAYMENT", (AUTHORIZE, CAPTURE))
ORDER_SAGA = SagaDefinition("ORDER", (RESERVE, AUTHORIZE, CAPTURE, SHIP))
SAGAS: dict[str, SagaDefinition] = {s.name: s for s in (PAYMENT_SAGA, ORDER_SAGA)}


@dataclass(frozen=True)
class SagaPolicy:
    """Timing and retry limits (wall clock for command timeouts and retries, event time for
    expiry). Every command, compensations included, retries by `retry`'s levels."""

    command_timeout_ms: int = 10_000
    #: Retry levels and the A/B strategies that set their delays (domain/retry.py).
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    #: An authorization not captured within this window (event time) is voided.
    auth_window_ms: int = 7 * DAY_MS
    #: When a completed payment's SETTLE goes out: with its merchant's batch.
    settlement: SettlementPolicy = field(default_factory=SettlementPolicy)


@dataclass(frozen=True)
class Command:
    """A command to send to a service, with its deterministic ids."""

    service: str
    action: str
    step: str
    role: str
    attempt: int
    command_id: str
    idempotency_key: str
    amount_minor: int


@dataclass(frozen=True)
class ScheduledRetry:
    """A retry the saga scheduled: what goes out (`command`: the next attempt, or an
    inquiry), at which level, when, under which variant, and why (the retry record)."""

    command: Command
    retry: int
    level: int
    due_at: int
    delay_ms: int
    variant: str
    error_class: ErrorClass
    reason: str


@dataclass(frozen=True)
class Review:
    """One reason for manual review (a DLQ record). `doubt`: the idempotency key of the
    command kept in `Payment.doubts` that an operator's resume would take up again (None:
    nothing to resume, the saga decided)."""

    reason: str
    doubt: str | None = None


@dataclass
class Effects:
    """What one input did: commands to send and what the status record should say."""

    commands: list[Command] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    step: str | None = None
    terminal: bool = False
    #: Reasons for manual review (a DLQ record each).
    review: list[Review] = field(default_factory=list)
    #: The input was refused (status REJECTED and the DLQ); nothing was applied.
    rejected: str | None = None
    replay: bool = False
    conflict: str | None = None
    #: A SETTLE that goes out with the merchant's settlement batch, not to the gateway now.
    settlement: Command | None = None
    #: Retries scheduled by this input (each also a record on payment.retry.<level>).
    retries: list[ScheduledRetry] = field(default_factory=list)
    #: The error class of each review reason (the DLQ record says it).
    review_class: ErrorClass = ErrorClass.UNKNOWN
    #: The outcome of the gateway call this answer answers (None: not such an answer).
    call_ok: bool | None = None
    #: An IN_DOUBT saga was taken up again (a resume, or a late answer): it had ended, so
    #: what was counted at its end is taken back.
    reopened: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.commands or self.notes or self.terminal or self.review
                    or self.settlement or self.retries)  # fmt: skip


class Unmatched(ValueError):
    """An outcome that answers no command this payment is waiting for."""


def _settle_key(p: Payment) -> str:
    """The idempotency key of a payment's SETTLE (one settlement per payment)."""
    return f"{p.payment_id}:settle:post"


def _request_key(p: Payment, o: Outstanding) -> str:
    """The upstream refund key behind a refund command's idempotency key."""
    return o.idempotency_key.removeprefix(f"{p.payment_id}:refund:")


@functools.lru_cache(maxsize=1 << 16)
def command_id(idempotency_key: str, attempt: int) -> str:
    """The id of one attempt of a command. Cached: an answer is matched by recomputing the
    ids of its payment's outstanding commands (`Orchestrator.find`), which were computed
    when they were sent, and a uuid5 is a SHA-1."""
    return derived_id(idempotency_key, "attempt", str(attempt))


@functools.lru_cache(maxsize=1 << 14)
def inquiry_id(idempotency_key: str, n: int) -> str:
    """The id of the n-th inquiry about a key: never an attempt's id, so the gateway's
    "never seen" is told apart from an answer to the command itself."""
    return derived_id(idempotency_key, "inquiry", str(n))


#: Phases of an outstanding command (`Outstanding.phase`).
SENT, WAITING, INQUIRING, HELD = "SENT", "WAITING", "INQUIRING", "HELD"


class Orchestrator:
    """Runs `SAGAS` over payment records.

    Every method changes the payment it is given, in place; `on_outcome` refuses an
    outcome (Unmatched, InvalidTransition) before it changes anything.
    """

    def __init__(self, policy: SagaPolicy | None = None) -> None:
        self.policy = policy or SagaPolicy()

    # ---- starting and advancing ---------------------------------------------------------
    def start(self, p: Payment, kind: str, now: int) -> Effects:
        if kind not in SAGAS:
            raise ValueError(f"unknown saga {kind!r}")
        p.saga = SagaState(kind=kind)
        p.retry_variant = self.policy.retry.variant_for(p.customer_id).name
        eff = Effects(notes=[f"{kind} saga started"])
        self._run_step(p, eff, now)
        return eff

    def _definition(self, p: Payment) -> SagaDefinition:
        assert p.saga is not None
        return SAGAS[p.saga.kind]

    def _run_step(self, p: Payment, eff: Effects, now: int) -> None:
        saga, steps = p.saga, self._definition(p).steps
        assert saga is not None
        if saga.step >= len(steps):
            eff.step = steps[-1].name
            eff.notes.append(f"{saga.kind} saga completed")
            self._finish(p, eff, "COMPLETED")  # captured: never cancels
            if p.captured_minor > 0:
                self._settle_in_batch(p, eff, now)
            return
        step = steps[saga.step]
        eff.step = step.name
        if step is CAPTURE and p.capture_mode == "MANUAL" and p.capture_minor is None:
            saga.awaiting_request = True
            p.auth_expires_at = (p.authorized_at or p.updated_at) + self.policy.auth_window_ms
            eff.notes.append("authorized; awaiting a capture request")
            return
        amount = {"AUTHORIZE": p.amount_minor,
                  "CAPTURE": p.capture_minor or p.authorized_minor}.get(step.action, 0)  # fmt: skip
        key = f"{p.payment_id}:{step.name}:action"
        self._send(p, eff, step.service, step.action, step.name, "action", amount, key, now)

    def _send(self, p: Payment, eff: Effects, service: str, action: str, step: str, role: str,
              amount: int, key: str, now: int) -> None:  # fmt: skip
        p.outstanding[key] = Outstanding(
            idempotency_key=key, service=service, action=action, step=step, role=role,
            amount_minor=amount, deadline=now + self.policy.command_timeout_ms,
        )  # fmt: skip
        eff.commands.append(
            Command(service, action, step, role, 1, command_id(key, 1), key, amount)
        )

    def _settle_in_batch(self, p: Payment, eff: Effects, now: int) -> None:
        """The SETTLE is outstanding from now, but it goes out with the merchant's batch
        (`eff.settlement`, docs/settlement.md), so its answer is awaited from the batch's
        expected submission on. An unanswered one is retried like any command, with the
        same idempotency key: the gateway answers a retried SETTLE once."""
        key = _settle_key(p)
        submitted = max(now, self.policy.settlement.expected_due(now))
        self._send(p, eff, "payment", "SETTLE", "settle", "post", p.captured_minor, key,
                   submitted)  # fmt: skip
        eff.settlement = eff.commands.pop()

    # ---- retries (domain/retry.py, docs/retries.md) -------------------------------------
    @staticmethod
    def _next_command(o: Outstanding, inquire: bool) -> Command:
        """What a retry of `o` sends: the command's next attempt, or the next inquiry."""
        key = o.idempotency_key
        if inquire:
            return Command(o.service, "INQUIRE", o.step, o.role, o.attempt,
                           inquiry_id(key, o.inquiries + 1), key, o.amount_minor)  # fmt: skip
        return Command(o.service, o.action, o.step, o.role, o.attempt + 1,
                       command_id(key, o.attempt + 1), key, o.amount_minor)  # fmt: skip

    def _schedule(self, p: Payment, eff: Effects, o: Outstanding, cls: ErrorClass, reason: str,
                  now: int, inquire: bool = False) -> bool:  # fmt: skip
        """Schedule `o`'s next retry at its level's delay (the payment's variant); False
        when the levels are used up. Nothing is sent now: the command-deadline timer sends
        it when due, so a waiting payment holds up nothing else."""
        retry = self.policy.retry
        level = retry.level_of(o.retries + 1)
        if level is None:
            return False
        delay = retry.delay_ms(p.retry_variant, level)
        nxt = self._next_command(o, inquire)
        o.retries += 1
        o.phase, o.next_inquiry, o.deadline = WAITING, inquire, now + delay
        o.error_class, o.reason = cls.value, reason
        variant = retry.variant(p.retry_variant).name
        eff.retries.append(ScheduledRetry(nxt, o.retries, level, now + delay, delay, variant, cls,
                                          reason))  # fmt: skip
        what = "inquiry" if inquire else f"attempt {nxt.attempt}"
        eff.notes.append(f"{o.action} {what} scheduled at retry level {level} in {delay} ms "
                         f"({cls.value}: {reason})")  # fmt: skip
        return True

    def _retry_now(self, p: Payment, eff: Effects, o: Outstanding, now: int) -> None:
        """A scheduled retry is due: send it (the same idempotency key, always)."""
        c = self._next_command(o, o.next_inquiry)
        if o.next_inquiry:
            o.inquiries += 1
            o.phase = INQUIRING
        else:
            o.attempt += 1
            o.phase = SENT
            if o.attempt > 1:  # a first attempt the breaker held is no re-send
                p.retries += 1
        o.next_inquiry, o.deadline = False, now + self.policy.command_timeout_ms
        eff.commands.append(c)
        eff.notes.append(f"{c.action} sent (retry {o.retries}, attempt {o.attempt})")

    def _inquire(self, p: Payment, eff: Effects, o: Outstanding, now: int) -> None:
        """No answer: ask the gateway what became of the key before anything is resent."""
        o.next_inquiry = True
        self._retry_now(p, eff, o, now)
        eff.notes[-1] = f"no answer to {o.action}: inquiry {o.inquiries} about its key sent"

    # ---- the circuit breaker (domain/breaker.py, docs/retries.md#the-circuit-breaker) ---
    @staticmethod
    def gateway_call(c: Command | Outstanding) -> bool:
        """Is `c` a call the gateway's circuit breaker decides on and counts? Every call the
        saga makes to the card gateway, but none about a settlement: a SETTLE goes out with
        its merchant's batch (the settlement agent), and its answer may come from the batch
        (so an inquiry about it, step "settle" too, is not gated either). One predicate for
        holding, for answers and for timeouts, so every permit gets its outcome."""
        return c.service == "payment" and c.step != "settle"

    def hold(self, p: Payment, eff: Effects, held: list[Command]) -> None:
        """The commands of `eff` the open breaker refused: not sent, their outstanding
        HELD. Their counters go back to what was sent, so a held command burns no attempt
        and a release sends exactly these commands, with the same ids."""
        for c in held:
            eff.commands.remove(c)
            o = p.outstanding[c.idempotency_key]
            if c.action == "INQUIRE":
                o.inquiries -= 1
                o.next_inquiry = True
            else:
                o.attempt -= 1
                o.next_inquiry = False
                if c.attempt > 1:
                    p.retries -= 1
            o.phase = HELD
            eff.notes.append(f"{c.action} held: the gateway's circuit breaker is open")

    def release(self, p: Payment, now: int) -> Effects:
        """Send what the breaker held for `p` (it let them through): no attempt was spent
        while held, so each goes out as the attempt or inquiry it would have been."""
        eff = Effects()
        for o in sorted(p.outstanding.values(), key=lambda o: o.idempotency_key):
            if o.phase == HELD:
                self._retry_now(p, eff, o, now)
                eff.notes[-1] = f"{eff.commands[-1].action} released by the circuit breaker"
        return eff

    def held(self, p: Payment) -> int:
        return sum(1 for o in p.outstanding.values() if o.phase == HELD)

    # ---- compensation -------------------------------------------------------------------
    def _compensate(self, p: Payment, eff: Effects, reason: str, now: int) -> None:
        saga = p.saga
        assert saga is not None
        saga.state, saga.reason, saga.awaiting_request = "COMPENSATING", reason, False
        saga.to_compensate = list(reversed(saga.completed))
        eff.notes.append(f"compensating: {reason}")
        self._next_compensation(p, eff, now)

    def _compensation_amount(self, p: Payment, step: Step) -> int:
        if step.compensation == "VOID":
            return p.authorized_minor - p.captured_minor - p.released_minor - p.voided_minor
        if step.compensation == "REFUND":
            return refundable(p)
        return 0

    def _next_compensation(self, p: Payment, eff: Effects, now: int) -> None:
        saga, steps = p.saga, self._definition(p).steps
        assert saga is not None
        while saga.to_compensate:
            step = steps[saga.to_compensate[0]]
            amount = self._compensation_amount(p, step)
            if step.service == "payment" and amount <= 0:
                saga.to_compensate.pop(0)  # nothing left to undo (e.g. void after capture)
                continue
            if step.compensation == "REFUND":
                p.refund_pending_minor += amount
            key = f"{p.payment_id}:{step.name}:compensation"
            eff.step = step.name
            self._send(p, eff, step.service, step.compensation, step.name, "compensation",
                       amount, key, now)  # fmt: skip
            return
        state = "COMPENSATED" if saga.completed else "FAILED"
        eff.notes.append(f"{saga.kind} saga {state.lower()}: {saga.reason}")
        self._finish(p, eff, state)

    def _in_doubt(self, p: Payment, eff: Effects, reason: str,
                  doubt: Outstanding | None = None) -> None:  # fmt: skip
        saga = p.saga
        assert saga is not None
        self._review(p, eff, reason, doubt)
        eff.notes.append(reason)
        if not saga.finished:
            saga.reason = reason
            self._finish(p, eff, "IN_DOUBT")

    def _finish(self, p: Payment, eff: Effects, state: str) -> None:
        """End the saga in `state` (terminal). A saga that decided its own end with nothing
        authorized cancels its payment: CANCELED, not INITIATED, is the final word. IN_DOUBT
        never does: a silent AUTHORIZE may have authorized, and a human decides."""
        saga = p.saga
        assert saga is not None and state in TERMINAL_SAGA_STATES
        saga.state, eff.terminal = state, True
        if state != "IN_DOUBT" and cancel_if_no_money_moved(p):
            eff.notes.append("payment canceled: no money moved")

    # ---- outcomes from the services -----------------------------------------------------
    def find(self, p: Payment, cmd_id: str | None) -> Outstanding | None:
        if cmd_id is None:
            return None
        for o in p.outstanding.values():
            key = o.idempotency_key
            if any(command_id(key, a) == cmd_id for a in range(1, o.attempt + 1)):
                return o
            if any(inquiry_id(key, n) == cmd_id for n in range(1, o.inquiries + 1)):
                return o
        return None

    def _on_inquiry(self, p: Payment, o: Outstanding, outcome: GatewayOutcome, now: int) -> Effects:
        """The gateway's answer to an inquiry about `o`'s key, when it has no outcome to
        replay (a recorded outcome comes back as the answer to the command itself):
        "never seen" is retried with the same key; a failed inquiry is asked again."""
        eff = Effects(step=o.step)
        if outcome.kind != "FAILED":
            raise InvalidTransition(f"{outcome.kind} answers an inquiry, not a command")
        latest = outcome.command_id == inquiry_id(o.idempotency_key, o.inquiries)
        if o.phase != INQUIRING or not latest:
            eff.notes.append(f"answer to an earlier inquiry about {o.action}: nothing to do")
            return eff
        if outcome.code == NEVER_SEEN:
            reason = f"the gateway never saw {o.action}"
            if not self._schedule(p, eff, o, ErrorClass.TRANSIENT, reason, now):
                self._exhausted(p, eff, o, ErrorClass.TRANSIENT, reason, now)
            return eff
        reason = f"inquiry failed: {outcome.reason or outcome.kind}"
        if not self._schedule(p, eff, o, ErrorClass.UNKNOWN, reason, now, inquire=True):
            self._exhausted(p, eff, o, ErrorClass.UNKNOWN, reason, now)
        return eff

    def on_outcome(
        self, p: Payment, service: str, outcome: GatewayOutcome, now: int
    ) -> tuple[Payment, Effects]:
        """The payment after a service's answer (`p`, changed in place), and what to send.

        Raises Unmatched or InvalidTransition, and then `p` is unchanged: every check comes
        before the first change, and `apply_transition` undoes its own on refusal.
        """
        o = self.find(p, outcome.command_id)
        if o is None:
            doubt = self._find_doubt(p, outcome.command_id)
            if doubt is not None and doubt.service == service:
                return self._late_answer(p, doubt, service, outcome, now)
        if o is None and self._settled_late(p, service, outcome):
            apply_transition(p, outcome)  # may raise InvalidTransition
            return p, Effects(
                step="settle",
                notes=["settled: the gateway's answer came after the saga stopped waiting for it"],
            )
        if o is None or o.service != service:
            raise Unmatched(f"{outcome.kind} answers no outstanding command of this payment")
        call = self._latest_call(o, outcome)
        p, eff = self._answered(p, o, service, outcome, now)
        if call:  # for the circuit breaker
            eff.call_ok = not gateway_failed(outcome.kind, outcome.retryable, outcome.code)
        return p, eff

    def _latest_call(self, o: Outstanding, outcome: GatewayOutcome) -> bool:
        """Does `outcome` answer the gateway call `o` is waiting for now? Only that answer
        counts for the breaker, so a call and the late answer to the one before it are not
        two outcomes. Inquiring, the latest call is the inquiry, answered by "never seen" or
        by the replay of the command's recorded outcome."""
        if not self.gateway_call(o) or o.phase not in (SENT, INQUIRING):
            return False
        key, got = o.idempotency_key, outcome.command_id
        if got == command_id(key, o.attempt):
            return True
        return o.phase == INQUIRING and got == inquiry_id(key, o.inquiries)

    def _answered(self, p: Payment, o: Outstanding, service: str, outcome: GatewayOutcome,
                  now: int) -> tuple[Payment, Effects]:  # fmt: skip
        if outcome.step == INQUIRY_STEP:
            return p, self._on_inquiry(p, o, outcome, now)
        eff = Effects(step=o.step)
        expected = self._expected(p, o)
        if outcome.kind not in expected:
            raise InvalidTransition(f"{outcome.kind} does not answer {o.action}")
        failed = outcome.kind == expected[1]
        # An answer for another amount than asked would strand or double-count money.
        exact = failed or service != "payment" or o.action == "AUTHORIZE"
        if not exact and outcome.amount_minor != o.amount_minor:
            raise InvalidTransition(
                f"{outcome.kind} of {outcome.amount_minor} answers {o.action} of {o.amount_minor}"
            )
        reason = outcome.reason or outcome.kind
        if failed and classify(outcome.retryable) is ErrorClass.TRANSIENT:
            if self._schedule(p, eff, o, ErrorClass.TRANSIENT, reason, now):
                return p, eff  # only the outstanding command changes
            self._exhausted(p, eff, o, ErrorClass.TRANSIENT, reason, now)
            return p, eff
        if service == "payment" and (not failed or o.role == "action"):
            apply_transition(p, outcome)  # may raise InvalidTransition
        del p.outstanding[o.idempotency_key]
        if failed:
            eff.review_class = ErrorClass.PERMANENT
        self._settle_answer(p, eff, o, failed, outcome, now)
        return p, eff

    def _settle_answer(self, p: Payment, eff: Effects, o: Outstanding, failed: bool,
                       outcome: GatewayOutcome, now: int) -> None:  # fmt: skip
        """The saga after the final answer to `o` (removed from the outstanding already)."""
        if o.role == "action":
            self._step_done(p, eff, o, failed, outcome, now)
        elif o.role == "compensation":
            if failed:
                self._in_doubt(p, eff, f"{o.action} failed after {o.retries} retries: "
                                       f"{outcome.reason}")  # fmt: skip
            else:
                assert p.saga is not None
                p.saga.to_compensate.pop(0)
                eff.notes.append(f"{o.step} compensated ({o.action})")
                self._next_compensation(p, eff, now)
        elif o.role == "request":  # a refund upstream asked for
            refund = p.refunds[_request_key(p, o)]
            if failed:
                refund.state, refund.reason = "FAILED", outcome.reason
                p.refund_pending_minor -= o.amount_minor
                eff.notes.append(f"refund of {o.amount_minor} failed: {outcome.reason}")
            else:
                refund.state = "DONE"
                eff.notes.append(f"refunded {outcome.amount_minor}")
        elif failed:  # post: settlement
            eff.review.append(Review(f"settlement failed: {outcome.reason}"))
            eff.notes.append(f"settlement failed: {outcome.reason}")
        else:
            eff.notes.append("settled")

    def _exhausted(self, p: Payment, eff: Effects, o: Outstanding, cls: ErrorClass, reason: str,
                   now: int) -> None:  # fmt: skip
        """The retry levels are used up: manual review (the DLQ), and the saga goes on as
        it defines. A failure known to have done nothing (transient, never seen) fails
        its step (compensation follows); an unknown outcome puts the saga in doubt."""
        del p.outstanding[o.idempotency_key]
        why = f"{o.action} given up after {o.retries} retries ({cls.value}): {reason}"
        eff.review_class = cls
        if o.role == "post" or (o.role == "request" and cls is ErrorClass.UNKNOWN):
            if o.role == "request":
                refund = p.refunds[_request_key(p, o)]
                refund.state, refund.reason = "IN_DOUBT", why
            self._review(p, eff, why, o)
            eff.notes.append(why)
            return
        if cls is ErrorClass.UNKNOWN or o.role == "compensation":
            self._in_doubt(p, eff, why, o)
            return
        eff.review.append(Review(why))
        failure = GatewayOutcome(kind="FAILED", event_id="", occurred_at=now, step=o.step,
                                 reason=why, retryable=True)  # fmt: skip
        if o.service == "payment" and o.role == "action":
            apply_transition(p, failure)  # like a decline: nothing was authorized
        self._settle_answer(p, eff, o, True, failure, now)

    # ---- in doubt: late answers and resumes (docs/retries.md#in-doubt-is-not-the-end) --
    @staticmethod
    def _review(p: Payment, eff: Effects, reason: str, doubt: Outstanding | None) -> None:
        """A reason for review; with `doubt`, the command given up is kept in the payment,
        so a late answer or an operator's resume can take it up again."""
        if doubt is not None:
            doubt.deadline = 0
            p.doubts[doubt.idempotency_key] = doubt
        eff.review.append(Review(reason, None if doubt is None else doubt.idempotency_key))

    def _reopen(self, p: Payment, eff: Effects, o: Outstanding) -> None:
        """The doubted command `o` is outstanding again, with a fresh retry budget, and what
        waited for it waits again: the refund, or the saga it had put IN_DOUBT."""
        del p.doubts[o.idempotency_key]
        p.outstanding[o.idempotency_key] = o
        o.retries, o.error_class, o.reason = 0, None, None
        saga = p.saga
        if o.role == "request":
            refund = p.refunds[_request_key(p, o)]
            refund.state, refund.reason = "PENDING", None
        elif (
            o.role in ("action", "compensation") and saga is not None and (saga.state == "IN_DOUBT")
        ):
            saga.state = "RUNNING" if o.role == "action" else "COMPENSATING"
            eff.reopened = True

    def resume(self, p: Payment, key: str, attempt: int, inquiries: int, now: int,
               redrive: dict[str, str] | None = None) -> Effects:  # fmt: skip
        """An operator's resume of a command given up (a redriven review letter,
        docs/dlq.md#resuming-a-review): the same key, a fresh retry budget, and first an
        inquiry where the gateway may have acted (the other services get the command
        again, which they deduplicate by key). Applied once: only while the command is in
        the very doubt the letter describes (`attempt`, `inquiries`); otherwise the
        effects say `replay` and the payment is unchanged."""
        o = p.doubts.get(key)
        if o is None or (o.attempt, o.inquiries) != (attempt, inquiries):
            return Effects(
                replay=True,
                notes=[f"resume of {key}: not in doubt any more (resumed already, or answered)"],
            )
        eff = Effects(step=o.step)
        self._reopen(p, eff, o)
        o.redrive = dict(redrive or {})
        o.next_inquiry = o.service == "payment"  # the gateway may have acted: ask first
        self._retry_now(p, eff, o, now)
        eff.notes[-1] = f"resumed by an operator: {eff.commands[-1].action} sent with the same key"
        return eff

    def _find_doubt(self, p: Payment, cmd_id: str | None) -> Outstanding | None:
        """The command given up that `cmd_id` is an attempt of (an inquiry's answer is not:
        "never seen" after the saga gave up is for the operator, not a reason to resend)."""
        if cmd_id is None:
            return None
        for o in p.doubts.values():
            if any(command_id(o.idempotency_key, a) == cmd_id for a in range(1, o.attempt + 1)):
                return o
        return None

    def _late_answer(self, p: Payment, o: Outstanding, service: str, outcome: GatewayOutcome,
                     now: int) -> tuple[Payment, Effects]:  # fmt: skip
        """The answer to a command given up, arriving after all: the doubt is resolved by
        it, as if it had come in time. A failure that says "try again" resolves nothing
        (an operator resumes with `paysaga dlq redrive`). Refused, `p` is unchanged."""
        inquiry = outcome.step == INQUIRY_STEP or outcome.code == NEVER_SEEN
        try_again = outcome.retryable and outcome.kind == self._expected(p, o)[1]
        if inquiry or try_again:  # any service's "try again", not only the gateway's
            why = outcome.code or "retryable"
            raise Unmatched(f"{outcome.kind} ({why}) answers {o.action}, given up: "
                            "resume it with `paysaga dlq redrive`")  # fmt: skip
        before = p.model_copy(deep=True)
        reopened = Effects()
        self._reopen(p, reopened, o)
        try:
            p, eff = self._answered(p, o, service, outcome, now)
        except InvalidTransition:
            for name in type(p).model_fields:
                setattr(p, name, getattr(before, name))
            raise
        eff.reopened = reopened.reopened
        eff.notes.insert(0, f"late answer to {o.action}, given up before: no longer in doubt")
        return p, eff

    def _settled_late(self, p: Payment, service: str, outcome: GatewayOutcome) -> bool:
        """A SETTLED answering one of this payment's SETTLE attempts after the saga gave up
        on it (its batch went out after the saga's own retries ran out): the money settled,
        and the payment says so. Settlement is a fact the gateway reports, not a step."""
        if service != "payment" or outcome.kind != "SETTLED" or outcome.command_id is None:
            return False
        saga = p.saga
        if saga is None or saga.state != "COMPLETED" or p.status is not PaymentStatus.CAPTURED:
            return False
        if outcome.amount_minor != p.captured_minor:
            return False
        if any(o.action == "SETTLE" for o in p.outstanding.values()):
            return False
        key = _settle_key(p)
        limit = self.policy.retry.max_retries + 1
        return any(command_id(key, a) == outcome.command_id for a in range(1, limit + 1))

    def _expected(self, p: Payment, o: Outstanding) -> tuple[str, str]:
        """(success, failure) outcome kinds that answer command `o`."""
        if o.role in ("request", "post"):
            return ("REFUNDED" if o.action == "REFUND" else "SETTLED"), "FAILED"
        definition = self._definition(p)
        step = definition.steps[definition.index(o.step)]
        if o.role == "action":
            return step.success, step.failure
        return step.compensated, ("FAILED" if step.service == "payment" else "_none_")

    def _step_done(self, p: Payment, eff: Effects, o: Outstanding, failed: bool,
                   outcome: GatewayOutcome, now: int) -> None:  # fmt: skip
        saga = p.saga
        assert saga is not None
        if failed:
            self._compensate(p, eff, f"{o.step} failed: {outcome.reason or outcome.kind}", now)
            return
        saga.completed.append(saga.step)
        eff.notes.append(f"{o.step} done")
        saga.step += 1
        self._run_step(p, eff, now)

    # ---- timers -------------------------------------------------------------------------
    def on_timeout(self, p: Payment, now: int) -> Effects:
        """Everything due by the wall clock: scheduled retries go out; a command without an
        answer is an unknown outcome, so the gateway is asked about its key first (other
        services are retried with the same key); after the last level, manual review."""
        eff = Effects()
        for o in sorted(p.outstanding.values(), key=lambda o: o.idempotency_key):
            if o.phase == HELD or o.deadline > now:
                continue
            if o.phase == WAITING:
                self._retry_now(p, eff, o, now)
                continue
            if o.phase == SENT and o.service == "payment":
                self._inquire(p, eff, o, now)
                continue
            asked = "INQUIRE" if o.phase == INQUIRING else o.action
            reason = f"no answer to {asked} within {self.policy.command_timeout_ms} ms"
            inquire = o.service == "payment"
            if not self._schedule(p, eff, o, ErrorClass.UNKNOWN, reason, now, inquire):
                self._exhausted(p, eff, o, ErrorClass.UNKNOWN, f"{reason}; outcome unknown", now)
        return eff

    def next_deadline(self, p: Payment) -> int | None:
        return min((o.deadline for o in p.outstanding.values() if o.phase != HELD), default=None)

    def expiry_due(self, p: Payment) -> int | None:
        """Event time at which an uncaptured manual authorization expires, if waiting."""
        saga = p.saga
        if saga is not None and saga.awaiting_request and not saga.finished:
            return p.auth_expires_at
        return None

    def on_auth_expiry(self, p: Payment, stream_time: int, now: int) -> Effects:
        eff = Effects()
        due = self.expiry_due(p)
        if due is not None and due <= stream_time:
            eff.step = CAPTURE.name
            self._compensate(p, eff, "authorization not captured within its window", now)
        return eff

    # ---- upstream requests --------------------------------------------------------------
    def _idempotent(self, known: str | None, fingerprint: str, eff: Effects) -> bool:
        """True when the request was seen before (replay or conflict recorded in `eff`)."""
        if known is None:
            return False
        if known == fingerprint:
            eff.replay = True
        else:
            eff.conflict = "idempotency key reused with a different request"
        return True

    def request_capture(self, p: Payment, key: str, fingerprint: str, amount: int | None,
                        now: int) -> Effects:  # fmt: skip
        eff = Effects(step=CAPTURE.name)
        if self._idempotent(p.requests.get(key), fingerprint, eff):
            return eff
        if (refused := capture_refusal(p, amount)) is not None:
            eff.rejected = refused
            return eff
        saga = p.saga
        assert saga is not None
        amount = p.authorized_minor if amount is None else amount
        p.requests[key] = fingerprint
        p.capture_minor, saga.awaiting_request = amount, False
        eff.notes.append(f"capture of {amount} requested")
        self._run_step(p, eff, now)
        return eff

    def request_cancel(self, p: Payment, key: str, fingerprint: str, now: int) -> Effects:
        eff = Effects(step=CAPTURE.name)
        if self._idempotent(p.requests.get(key), fingerprint, eff):
            return eff
        if (refused := cancel_refusal(p)) is not None:
            eff.rejected = refused
            return eff
        p.requests[key] = fingerprint
        self._compensate(p, eff, "cancelled by request", now)
        return eff

    def request_refund(self, p: Payment, key: str, fingerprint: str, amount: int | None,
                       now: int) -> Effects:  # fmt: skip
        eff = Effects(step="refund")
        known = p.refunds.get(key)
        if self._idempotent(None if known is None else known.fingerprint, fingerprint, eff):
            return eff
        if (refused := refund_refusal(p, amount)) is not None:
            eff.rejected = refused
            return eff
        amount = refundable(p) if amount is None else amount
        p.refunds[key] = RefundRequest(fingerprint=fingerprint, amount_minor=amount)
        p.refund_pending_minor += amount
        self._send(p, eff, "payment", "REFUND", "refund", "request", amount,
                   f"{p.payment_id}:refund:{key}", now)  # fmt: skip
        eff.notes.append(f"refund of {amount} requested")
        return eff


def capture_refusal(p: Payment, amount: int | None) -> str | None:
    """Why a capture request of `amount` (None: all authorized) would be refused now, or
    None. The saga decides with it, and the payments API asks it before writing a request
    (streams/ops/api.py), so the two cannot disagree on committed state."""
    saga = p.saga
    if saga is None or not saga.awaiting_request:
        return (f"no authorization awaits capture (status {p.status.value}, "
                f"saga {None if saga is None else saga.state})")  # fmt: skip
    amount = p.authorized_minor if amount is None else amount
    if not 0 < amount <= p.authorized_minor:
        return f"capture of {amount} is not within the {p.authorized_minor} authorized"
    return None


def cancel_refusal(p: Payment) -> str | None:
    """Why a cancel request would be refused now, or None (see `capture_refusal`)."""
    if p.saga is None or not p.saga.awaiting_request:
        return "only an authorization awaiting capture can be cancelled"
    return None


def refundable(p: Payment) -> int:
    """Captured money not yet refunded nor promised to a refund in flight."""
    return p.captured_minor - p.refunded_minor - p.refund_pending_minor


def refund_refusal(p: Payment, amount: int | None) -> str | None:
    """Why a refund of `amount` (None: all refundable) would be refused now, or None."""
    saga = p.saga
    if saga is None or saga.state != "COMPLETED" or p.captured_minor == 0:
        return f"nothing captured to refund (status {p.status.value})"
    room = refundable(p)
    amount = room if amount is None else amount
    if not 0 < amount <= room:
        return f"refund of {amount} exceeds the {room} refundable"
    return None


__all__ = [
    "HELD", "INQUIRING", "SAGAS", "SENT", "WAITING", "Command", "Effects", "InvalidTransition",
    "Orchestrator", "SagaDefinition", "SagaPolicy", "ScheduledRetry", "Step", "Unmatched",
    "cancel_refusal", "capture_refusal", "command_id", "inquiry_id", "refund_refusal",
    "refundable",
]  # fmt: skip
