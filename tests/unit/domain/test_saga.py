"""The saga orchestrator against simulated services.

A hypothesis driver plays every service, upstream and the timers at once: it answers
outstanding commands (successes, failures, retryable failures, answers to older attempts),
fires command timeouts and authorization expiry, sends capture / cancel / refund requests
(reusing keys with the same or another fingerprint) and stray outcomes. After every input it
checks the money rules and the saga's bookkeeping. Examples pin the named paths.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from paysaga.domain.lifecycle import GatewayOutcome, InvalidTransition, invariant_violations
from paysaga.domain.payment import Outstanding, Payment, PaymentStatus, initiate, status_event
from paysaga.domain.retry import INQUIRY_STEP, NEVER_SEEN
from paysaga.domain.saga import (
    INQUIRING,
    ORDER_SAGA,
    PAYMENT_SAGA,
    SAGAS,
    SENT,
    WAITING,
    Command,
    Effects,
    Orchestrator,
    SagaPolicy,
    Unmatched,
    command_id,
    inquiry_id,
)
from paysaga.schemas.codec import AvroCodec
from paysaga.schemas.models import PaymentInitiated, PaymentStatusChanged
from paysaga.schemas.registry import SchemaRegistry
from tests.samples import initiated

S = PaymentStatus
T0 = 1_700_000_000_000
POLICY = SagaPolicy()
#: The drawn inputs of the saga property tests: which saga, capture mode, amount, and a
#: data object for the sequence of service behaviour.
SAGA_CASES = {
    "kind": st.sampled_from(sorted(SAGAS)),
    "mode": st.sampled_from(["AUTOMATIC", "MANUAL"]),
    "amount": st.integers(1, 2_000),
    "data": st.data(),
}
_SAMPLE = initiated(1)[0]
_ids = itertools.count(1)


def payment(kind: str = "PAYMENT", capture_mode: str = "AUTOMATIC", amount: int = 1000) -> Payment:
    items = [{"sku": "sku-1", "quantity": 2}] if kind == "ORDER" else []
    return initiate(
        PaymentInitiated.model_validate(
            {
                **_SAMPLE,
                "amount_minor": amount,
                "capture_mode": capture_mode,
                "saga": kind,
                "items": items,
                "occurred_at": T0,
            }
        )
    )


def snapshot(p: Payment) -> dict:
    return p.model_dump()


def answer(
    orch: Orchestrator,
    p: Payment,
    o: Outstanding,
    *,
    success: bool = True,
    attempt: int | None = None,
    retryable: bool = False,
    amount: int | None = None,
    now: int = T0,
) -> tuple[Payment, Effects]:
    """Answer outstanding command `o` as its service would."""
    ok, failure = orch._expected(p, o)
    kind = ok if success else failure
    if amount is None:
        amount = o.amount_minor if (o.service == "payment" and success) else 0
    n = next(_ids)
    out = GatewayOutcome(
        kind=kind,
        event_id=f"ev-{n}",
        occurred_at=now,
        amount_minor=amount,
        command_id=command_id(o.idempotency_key, attempt or o.attempt),
        step=None if success else o.step,
        reason=None if success else "declined",
        retryable=retryable,
    )
    return orch.on_outcome(p, o.service, out, now)


def sent(eff: Effects) -> list[Command]:
    """What an input sent: its commands, and a SETTLE handed to the settlement batch."""
    return [*eff.commands, *([eff.settlement] if eff.settlement else [])]


def only(p: Payment) -> Outstanding:
    assert len(p.outstanding) == 1, p.outstanding
    return next(iter(p.outstanding.values()))


def by_action(p: Payment, action: str) -> Outstanding:
    [o] = [o for o in p.outstanding.values() if o.action == action]
    return o


def silence(orch: Orchestrator, p: Payment, key: str) -> list[Effects]:
    """Fire the command-deadline timer, on time, until the command under `key` is given up
    (nobody answers anything, inquiries included); every firing's effects."""
    out = []
    while key in p.outstanding:
        out.append(orch.on_timeout(p, p.outstanding[key].deadline))
        assert len(out) < 100
    return out


# ---- the simulated-services driver ------------------------------------------------------


@dataclass
class Run:
    """What the driver saw over one run, to check properties across inputs."""

    orch: Orchestrator
    p: Payment
    clock: int = T0
    stream_time: int = T0
    terminal_flags: int = 0
    finished_state: str | None = None
    commands: dict[str, Command] = field(default_factory=dict)  # by command_id
    per_key: dict[str, tuple] = field(default_factory=dict)  # key -> (service, action, ...)
    attempts: dict[str, int] = field(default_factory=dict)  # key -> last attempt sent
    answered: dict[str, str] = field(default_factory=dict)  # key -> outcome kind applied
    refunded_by_key: dict[str, int] = field(default_factory=dict)
    #: Refunds given up on (outcome unknown): their money stays pending for a human.
    stuck_refunds: int = 0

    def record(self, eff: Effects, before: dict, was_finished: bool) -> None:
        p = self.p
        assert invariant_violations(p) == []
        saga = p.saga
        assert saga is not None
        if eff.reopened:  # IN_DOUBT taken up again (a late answer): it is not finished
            assert before["saga"]["state"] == "IN_DOUBT" and was_finished
            was_finished, self.finished_state = False, None
            self.terminal_flags -= 1
        # The terminal flag: raised exactly when the saga becomes finished, so once for
        # each time it finishes (an IN_DOUBT reopened finishes again).
        assert eff.terminal == (not was_finished and saga.finished), (eff, saga)
        self.terminal_flags += eff.terminal
        assert self.terminal_flags <= 1
        if self.finished_state is not None:
            assert saga.state == self.finished_state, "a finished saga never moves"
        elif saga.finished:
            self.finished_state = saga.state
        if eff.rejected or eff.replay or eff.conflict:
            assert not eff.commands and snapshot(p) == before, eff
        for c in sent(eff):
            assert c.command_id not in self.commands, f"command id reused: {c}"
            self.commands[c.command_id] = c
            if c.action == "INQUIRE":  # about the last attempt sent, under the same key
                o = p.outstanding[c.idempotency_key]
                assert c.command_id == inquiry_id(c.idempotency_key, o.inquiries), c
                assert c.service == "payment" and c.attempt == self.attempts[c.idempotency_key]
                continue
            assert c.command_id == command_id(c.idempotency_key, c.attempt)
            shape = (c.service, c.action, c.step, c.role, c.amount_minor)
            assert self.per_key.setdefault(c.idempotency_key, shape) == shape, (c, shape)
            assert c.attempt == self.attempts.get(c.idempotency_key, 0) + 1, c
            self.attempts[c.idempotency_key] = c.attempt
            assert c.idempotency_key not in self.answered, f"{c} sent after its answer"
            if c.service == "payment" and c.action != "SETTLE":
                assert c.amount_minor > 0, c
            if saga.finished and was_finished:
                assert c.role in ("request", "post"), f"{c} from a finished saga"
        # Every outstanding command is the last one sent under its key.
        for key, o in p.outstanding.items():
            assert key == o.idempotency_key and self.attempts[key] == o.attempt
            assert self.per_key[key] == (o.service, o.action, o.step, o.role, o.amount_minor)
        saga_work = [o for o in p.outstanding.values() if o.role in ("action", "compensation")]
        assert len(saga_work) <= 1, saga_work
        if saga.state in ("RUNNING", "COMPENSATING") and not saga.awaiting_request:
            assert len(saga_work) == 1, "a running saga always waits for something"
        if saga.finished or saga.awaiting_request:
            assert not saga_work
        # Money refunded is exactly what the REFUND commands' answers said, within capture.
        assert p.refunded_minor == sum(self.refunded_by_key.values())
        assert sum(self.refunded_by_key.values()) <= p.captured_minor
        pending = sum(o.amount_minor for o in p.outstanding.values() if o.action == "REFUND")
        assert p.refund_pending_minor == pending + self.stuck_refunds
        if p.status is S.FAILED:
            assert saga.state in ("FAILED", "COMPENSATING", "COMPENSATED", "IN_DOUBT")
        # CANCELED: exactly a saga that decided its end with nothing authorized. IN_DOUBT
        # keeps the last known status (a silent AUTHORIZE may have authorized).
        if p.status is S.CANCELED:
            assert saga.state in ("FAILED", "COMPENSATED") and p.authorized_minor == 0
        if saga.finished and saga.state != "IN_DOUBT":
            assert p.status is not S.INITIATED, "a finished saga's final word is never INITIATED"


def fire_timeout(run: Run, data: st.DataObject, now: int | None = None) -> str:
    orch, p = run.orch, run.p
    before, was_finished = snapshot(p), p.saga is not None and p.saga.finished
    outstanding = {k: o.model_copy() for k, o in p.outstanding.items()}
    if now is None:
        now = data.draw(st.sampled_from([run.clock, orch.next_deadline(p) or run.clock]))
    run.clock = max(run.clock, now)
    eff = orch.on_timeout(p, now)
    for key, o in outstanding.items():
        q = p.outstanding.get(key)
        if o.deadline > now:
            assert q == o, "a command not yet due is left alone"
        elif o.phase == WAITING:  # the scheduled retry goes out now, never before
            assert q is not None and q.deadline == now + POLICY.command_timeout_ms
            if o.next_inquiry:
                assert (q.phase, q.inquiries, q.attempt) == (INQUIRING, o.inquiries + 1, o.attempt)
            else:
                assert (q.phase, q.attempt) == (SENT, o.attempt + 1)
        elif o.phase == SENT and o.service == "payment":  # no answer: ask about the key first
            assert q is not None and (q.phase, q.inquiries) == (INQUIRING, o.inquiries + 1)
            assert q.attempt == o.attempt
        elif q is not None:  # still unknown: a retry scheduled at its level's delay
            assert q.phase == WAITING and q.retries == o.retries + 1
            assert q.next_inquiry == (o.service == "payment")
            [r] = [r for r in eff.retries if r.command.idempotency_key == key]
            level = POLICY.retry.level_of(q.retries)
            assert level is not None and r.level == level and r.due_at == q.deadline
            assert q.deadline == now + POLICY.retry.delay_ms(p.retry_variant, level)
        else:  # gave up: manual review
            assert o.retries == POLICY.retry.max_retries and eff.review
            run.answered[key] = "no answer"
            run.stuck_refunds += o.amount_minor if o.action == "REFUND" else 0
    if not any(o.deadline <= now for o in outstanding.values()):
        assert snapshot(p) == before and not eff.changed
    run.record(eff, before, was_finished)
    return "review" if eff.review else "retry"


def book_answer(run: Run, o: Outstanding, success: bool) -> None:
    """What the driver keeps of the final answer to `o`."""
    ok, failure = run.orch._expected(run.p, o)
    run.answered[o.idempotency_key] = ok if success else failure
    if success and o.action == "REFUND":
        run.refunded_by_key[o.idempotency_key] = o.amount_minor
    if not success and o.action == "REFUND" and o.role == "compensation":
        run.stuck_refunds += o.amount_minor  # the saga is in doubt: a human decides


def late_answer(run: Run, data: st.DataObject, before: dict, was_finished: bool) -> str:
    """An answer to a command given up (`Payment.doubts`), arriving after all: a success
    or a final failure is applied as if in time; "try again", another kind, a wrong amount
    or another service's answer is refused, and the payment is as it was."""
    orch, p = run.orch, run.p
    o = data.draw(
        st.sampled_from(sorted(p.doubts.values(), key=lambda o: o.idempotency_key))
    ).model_copy()
    ok, failure = orch._expected(p, o)
    how = data.draw(st.sampled_from(["success", "success", "final", "again", "kind", "amount",
                                     "service"]), label="late")  # fmt: skip
    if failure == "_none_" and how in ("final", "again"):
        how = "success"
    if o.service != "payment" and how == "amount":
        how = "kind"  # only the gateway's answers carry money
    kind = {"final": failure, "again": failure}.get(how, ok)
    if how == "kind":
        kind = data.draw(st.sampled_from([k for k in ("AUTHORIZED", "CAPTURED", "VOIDED",
                                                      "REFUNDED", "RESERVED", "CREATED")
                                          if k not in (ok, failure)]))  # fmt: skip
    amount = o.amount_minor if (o.service == "payment" and kind == ok) else 0
    out = GatewayOutcome(
        kind=kind,
        event_id=f"ev-{next(_ids)}",
        occurred_at=run.clock,
        amount_minor=-1 if how == "amount" else amount,
        command_id=command_id(o.idempotency_key, data.draw(st.integers(1, o.attempt))),
        step=None if kind == ok else o.step,
        reason=None if kind == ok else "declined",
        retryable=how == "again",
    )
    service = o.service
    if how == "service":
        service = data.draw(st.sampled_from([s for s in ("payment", "inventory", "shipping")
                                             if s != o.service]))  # fmt: skip
    if how in ("again", "kind", "amount", "service"):
        with pytest.raises((Unmatched, InvalidTransition)) as refused:
            orch.on_outcome(p, service, out, run.clock)
        assert snapshot(p) == before
        assert isinstance(refused.value, Unmatched) == (how in ("again", "service"))
        return f"late {how} refused"
    try:
        q, eff = orch.on_outcome(p, service, out, run.clock)
    except InvalidTransition:
        # As in time: the one well-formed answer the record refuses (see "answer refused").
        assert (o.action, p.status, how) == ("SETTLE", S.REVERSED, "success")
        assert snapshot(p) == before
        return "late answer refused"
    run.p = p = q
    key = o.idempotency_key
    assert key not in p.doubts and key not in p.outstanding
    assert eff.notes[0].startswith(f"late answer to {o.action}")
    if o.action == "REFUND" and (o.role == "compensation" or o.role == "request"):
        run.stuck_refunds -= o.amount_minor  # no longer given up: it is answered now
    del run.answered[key]
    book_answer(run, o, how == "success")
    run.record(eff, before, was_finished)
    return f"late {how}"


def act(run: Run, data: st.DataObject) -> str:
    """One random input; returns its name (for hypothesis statistics)."""
    orch, p = run.orch, run.p
    run.clock += data.draw(st.integers(0, 3_000), label="tick")
    choices = ["timeout", "expiry", "capture", "cancel", "refund", "stray", "wrong_kind"]
    if p.outstanding:
        choices += ["answer"] * 8 + ["silence"]
    if any(o.phase == INQUIRING for o in p.outstanding.values()):
        choices += ["inquiry"] * 3
    if p.doubts:
        choices += ["late"] * 3
    if p.saga is not None and p.saga.awaiting_request:
        choices += ["capture", "capture", "cancel", "expiry"]
    if p.saga is not None and p.saga.state == "COMPLETED":
        choices += ["refund"] * 3
    what = data.draw(st.sampled_from(choices), label="input")
    before, was_finished = snapshot(p), p.saga is not None and p.saga.finished

    if what == "answer":
        o = data.draw(
            st.sampled_from(sorted(p.outstanding.values(), key=lambda o: o.idempotency_key))
        ).model_copy()  # as it was: the orchestrator changes the payment's own in place
        _, failure = orch._expected(p, o)
        success = failure == "_none_" or data.draw(
            st.sampled_from([True] * 3 + [False]), label="success"
        )
        attempt = data.draw(st.integers(1, o.attempt), label="attempt")
        retryable = data.draw(st.booleans(), label="retryable")
        try:
            q, eff = answer(
                orch, p, o, success=success, attempt=attempt, retryable=retryable, now=run.clock
            )
        except InvalidTransition:
            # The only well-formed answer the record refuses: a settlement after a full
            # refund (see test_settlement_after_a_full_refund_is_accepted).
            assert (o.action, p.status, success) == ("SETTLE", S.REVERSED, True)
            assert snapshot(p) == before
            return "answer refused"
        run.p = p = q
        key = o.idempotency_key
        if o.idempotency_key in p.outstanding:  # a retry scheduled, nothing sent now
            waiting = p.outstanding[key]
            assert not success and retryable and waiting.phase == WAITING
            assert waiting.retries == o.retries + 1 and waiting.attempt == o.attempt
            assert not eff.commands
            assert [r.command.idempotency_key for r in eff.retries] == [key]
            assert {k: v for k, v in before.items() if k != "outstanding"} == {
                k: v for k, v in snapshot(p).items() if k != "outstanding"
            }
        else:
            book_answer(run, o, success)
        run.record(eff, before, was_finished)
        return f"answer {o.action} {'ok' if success else 'failed'}"

    if what == "late":
        return late_answer(run, data, before, was_finished)

    if what == "inquiry":  # the gateway on an inquiry: never saw the key, or a 503
        o = data.draw(st.sampled_from(sorted((o for o in p.outstanding.values()
                                              if o.phase == INQUIRING),
                                             key=lambda o: o.idempotency_key))
                      ).model_copy()  # fmt: skip
        unseen = data.draw(st.booleans(), label="never seen")
        n = data.draw(st.integers(1, o.inquiries), label="inquiry")
        out = GatewayOutcome(kind="FAILED", event_id=f"ev-{next(_ids)}", occurred_at=run.clock,
                             command_id=inquiry_id(o.idempotency_key, n), step=INQUIRY_STEP,
                             code=NEVER_SEEN if unseen else "gateway_unavailable",
                             reason="inquiry", retryable=True)  # fmt: skip
        q, eff = orch.on_outcome(p, "payment", out, run.clock)
        key = o.idempotency_key
        if n < o.inquiries:  # an earlier inquiry's answer: nothing changes
            assert snapshot(p) == before and not eff.commands and not eff.retries
        elif key in p.outstanding:
            r = p.outstanding[key]
            assert r.phase == WAITING and r.next_inquiry == (not unseen) and not eff.commands
        else:
            assert eff.review and o.retries == POLICY.retry.max_retries
            run.answered[key] = "given up"
            if o.action == "REFUND" and o.role == "compensation":
                run.stuck_refunds += o.amount_minor
        run.record(eff, before, was_finished)
        return f"inquiry {'never seen' if unseen else 'failed'}"

    if what == "silence":  # nobody answers one command: it is given up (a doubt, mostly)
        key = data.draw(st.sampled_from(sorted(p.outstanding)), label="silenced")
        while key in run.p.outstanding:
            fire_timeout(run, data, now=max(run.clock, run.p.outstanding[key].deadline))
        return "silence"

    if what == "timeout":  # one timer firing, or several in a row (exhausting retries)
        names = [fire_timeout(run, data) for _ in range(data.draw(st.sampled_from([1, 1, 12])))]
        return "timeout" + (" (review)" if "review" in names else "")

    if what == "expiry":
        due = orch.expiry_due(p)
        base = due if due is not None else run.stream_time
        run.stream_time = max(
            run.stream_time, data.draw(st.sampled_from([base - 1, base, base + 1]))
        )
        eff = orch.on_auth_expiry(p, run.stream_time, run.clock)
        if due is not None and due <= run.stream_time:
            assert p.saga is not None and p.saga.state == "COMPENSATING"
            assert [c.action for c in eff.commands] == ["VOID"]
            assert eff.commands[0].amount_minor == p.authorized_minor
        else:
            assert snapshot(p) == before and not eff.changed
        run.record(eff, before, was_finished)
        return "expiry" + (" fired" if eff.commands else "")

    key = data.draw(st.sampled_from(["k1", "k2", "k3"]), label="key")
    fp = data.draw(st.sampled_from(["f1", "f2"]), label="fingerprint")
    if what in ("capture", "cancel", "refund"):
        room = {
            "capture": p.authorized_minor,
            "refund": p.captured_minor - p.refunded_minor - p.refund_pending_minor,
            "cancel": 0,
        }[what]
        amount = data.draw(
            st.sampled_from([None, 0, -1, room, room + 1, max(1, room // 2)])
            | st.integers(1, p.amount_minor),
            label="amount",
        )
        saga = p.saga
        assert saga is not None
        within = 0 < (room if amount is None else amount) <= room
        if what == "capture":
            fresh_ok = saga.awaiting_request and within
            eff = orch.request_capture(p, key, fp, amount, run.clock)
            known = before["requests"].get(key)
        elif what == "cancel":
            fresh_ok = saga.awaiting_request
            eff = orch.request_cancel(p, key, fp, run.clock)
            known = before["requests"].get(key)
        else:
            fresh_ok = saga.state == "COMPLETED" and p.captured_minor > 0 and within
            eff = orch.request_refund(p, key, fp, amount, run.clock)
            known = before["refunds"].get(key, {}).get("fingerprint")
        if known is not None:
            assert eff.replay == (known == fp) and bool(eff.conflict) == (known != fp)
            assert snapshot(p) == before and not eff.commands
            outcome = "replay" if eff.replay else "conflict"
        elif not fresh_ok:
            assert eff.rejected and snapshot(p) == before and not eff.commands
            outcome = "rejected"
        else:
            assert not (eff.rejected or eff.replay or eff.conflict)
            outcome = "accepted"
            if what == "capture":
                assert p.capture_minor == (room if amount is None else amount)
                [c] = eff.commands
                assert (c.action, c.amount_minor) == ("CAPTURE", p.capture_minor)
            elif what == "cancel":
                assert [c.action for c in eff.commands] == ["VOID"]
            else:
                [c] = eff.commands
                assert (c.action, c.role, c.amount_minor) == (
                    "REFUND",
                    "request",
                    p.refunds[key].amount_minor,
                )
        run.record(eff, before, was_finished)
        return f"{what} {outcome}"

    # stray outcomes: nothing may change
    kinds = (
        "AUTHORIZED",
        "CAPTURED",
        "FAILED",
        "VOIDED",
        "REFUNDED",
        "SETTLED",
        "RESERVED",
        "RELEASED",
        "CREATED",
        "CANCELLED",
    )
    services = ("payment", "inventory", "shipping")
    if what == "wrong_kind" and p.outstanding:
        o = sorted(p.outstanding.values(), key=lambda o: o.idempotency_key)[0]
        kind = data.draw(st.sampled_from([k for k in kinds if k not in orch._expected(p, o)]))
        out = GatewayOutcome(
            kind,
            f"ev-{next(_ids)}",
            run.clock,
            command_id(o.idempotency_key, o.attempt),
            o.amount_minor,
        )
        with pytest.raises(InvalidTransition):
            orch.on_outcome(p, o.service, out, run.clock)
        assert snapshot(p) == before
        return "wrong kind"
    candidates = [None, "not-a-command-id"]
    candidates += [
        command_id(k, a)
        for k, a in run.attempts.items()
        if k not in p.outstanding and k not in p.doubts  # a doubt's answer: "late"
    ]
    candidates += [command_id(k, o.attempt + 1) for k, o in p.outstanding.items()]
    cid = data.draw(st.sampled_from(candidates), label="stray id")
    service = data.draw(st.sampled_from(services))
    if bool(p.outstanding) and data.draw(st.booleans()):  # the right command, the wrong service
        o = data.draw(
            st.sampled_from(sorted(p.outstanding.values(), key=lambda o: o.idempotency_key))
        )
        cid = command_id(o.idempotency_key, o.attempt)
        service = data.draw(st.sampled_from([s for s in services if s != o.service]))
    out = GatewayOutcome(
        data.draw(st.sampled_from(kinds)),
        f"ev-{next(_ids)}",
        run.clock,
        cid,
        data.draw(st.integers(-1, p.amount_minor)),
    )
    if orch._settled_late(p, service, out):  # the one answer that counts after the fact
        q, eff = orch.on_outcome(p, service, out, run.clock)
        assert q.status is PaymentStatus.SETTLED and not eff.commands
        return "late settlement"
    with pytest.raises(Unmatched):
        orch.on_outcome(p, service, out, run.clock)
    assert snapshot(p) == before
    return "stray"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**SAGA_CASES)
def test_simulated_services_never_break_the_saga(
    kind: str, mode: str, amount: int, data: st.DataObject
) -> None:
    orch = Orchestrator(POLICY)
    run = Run(orch, payment(kind, mode, amount))
    before = snapshot(run.p)
    eff = orch.start(run.p, kind, T0)
    run.record(eff, before, False)
    assert [c.step for c in eff.commands] == [SAGAS[kind].steps[0].name]
    for _ in range(data.draw(st.integers(1, 60), label="inputs")):
        event(act(run, data))
    saga = run.p.saga
    assert saga is not None
    event(f"{kind} {mode}: saga {saga.state}, payment {run.p.status.value}")
    if saga.state == "COMPLETED":
        assert run.p.captured_minor > 0 and saga.completed == list(range(len(SAGAS[kind].steps)))
    if saga.state in ("COMPENSATED", "FAILED"):
        p = run.p
        assert p.captured_minor == p.refunded_minor  # nothing kept, nothing left on hold
        assert p.authorized_minor == p.captured_minor + p.released_minor + p.voided_minor
        assert p.status in (S.CANCELED, S.FAILED, S.REVERSED)


# ---- liveness ---------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(**SAGA_CASES)
def test_successful_services_complete_every_saga(
    kind: str, mode: str, amount: int, data: st.DataObject
) -> None:
    """Answers that are late (timeouts, answers to older attempts) but all successful."""
    orch = Orchestrator(POLICY)
    p, now = payment(kind, mode, amount), T0
    eff = orch.start(p, kind, now)
    terminal: int
    terminal, out, capture = eff.terminal, list(eff.commands), None
    for _ in range(100):
        saga = p.saga
        assert saga is not None
        if saga.finished:
            break
        now += 1_000
        if saga.awaiting_request:
            capture = data.draw(st.one_of(st.none(), st.integers(1, p.authorized_minor)))
            eff = orch.request_capture(p, "capture-1", "fp", capture, now)
        else:
            o = only(p)
            if o.retries < POLICY.retry.max_retries - 2 and data.draw(st.booleans()):
                eff = orch.on_timeout(p, o.deadline)  # the answer is late: a retry goes out
            else:
                p, eff = answer(orch, p, o, attempt=data.draw(st.integers(1, o.attempt)), now=now)
        terminal += eff.terminal
        out += sent(eff)
        assert invariant_violations(p) == []
    assert p.saga is not None and p.saga.state == "COMPLETED" and terminal == 1
    expected_capture = capture if mode == "MANUAL" and capture is not None else amount
    assert (p.authorized_minor, p.captured_minor) == (amount, expected_capture)
    assert p.released_minor == amount - expected_capture
    steps = [s.name for s in SAGAS[kind].steps]
    assert [c.step for c in out if c.attempt == 1 and c.action != "INQUIRE"] == [
        *steps,
        "settle",
    ]
    p, eff = answer(orch, p, by_action(p, "SETTLE"), now=now)
    assert p.status is S.SETTLED and not p.outstanding and not eff.terminal


@pytest.mark.parametrize("kind", sorted(SAGAS))
@pytest.mark.parametrize("mode", ["AUTOMATIC", "MANUAL"])
def test_first_step_failing_fails_the_saga_with_nothing_else_sent(kind: str, mode: str) -> None:
    orch = Orchestrator()
    p = payment(kind, mode)
    eff = orch.start(p, kind, T0)
    [first] = eff.commands
    p, eff = answer(orch, p, only(p), success=False, retryable=False)
    assert eff.commands == [] and eff.terminal
    assert p.saga is not None and p.saga.state == "FAILED" and not p.outstanding
    # declined: FAILED; inventory refused (nothing authorized, nothing declined): CANCELED
    assert p.status is (S.FAILED if first.action == "AUTHORIZE" else S.CANCELED)
    assert p.authorized_minor == 0


# ---- CANCELED: the saga ended before any money moved ------------------------------------


def published(p: Payment, eff: Effects, previous: PaymentStatus) -> dict:
    """Record the input as the saga agent does, and return the PaymentStatusChanged it sends
    for `eff` (validated, and through Avro)."""
    cause = "5f0b8d3c-0000-4000-8000-00000000c0de"
    p.record(cause, "Input", T0 + 1)
    record = status_event(p, cause_event_id=cause, occurred_at=T0 + 1, previous=previous.value,
                          reason="; ".join(eff.notes), terminal=eff.terminal,
                          step=eff.step)  # fmt: skip
    record = PaymentStatusChanged.model_validate(record).to_avro()
    codec = AvroCodec(SchemaRegistry())
    assert codec.decode(codec.encode("PaymentStatusChanged", record), "PaymentStatusChanged") == (
        record
    )
    return record


@pytest.mark.parametrize("mode", ["AUTOMATIC", "MANUAL"])
def test_inventory_refused_order_saga_ends_canceled(mode: str) -> None:
    orch = Orchestrator()
    p = payment("ORDER", mode)
    orch.start(p, "ORDER", T0)
    assert only(p).action == "RESERVE"
    previous = p.status  # on_outcome changes `p` in place
    q, eff = answer(orch, p, only(p), success=False)  # RESERVATION_FAILED
    assert eff.terminal and eff.commands == [] and not q.outstanding
    assert q.saga is not None and q.saga.state == "FAILED"
    assert q.status is S.CANCELED and (q.authorized_minor, q.captured_minor) == (0, 0)
    status = published(q, eff, previous)
    assert (status["status"], status["previous_status"]) == ("CANCELED", "INITIATED")
    assert (status["terminal"], status["saga_state"]) == (True, "FAILED")
    assert q.history[-1].status is S.CANCELED
    # nothing follows a canceled payment
    assert orch.request_capture(q, "cap", "fp", None, T0).rejected
    assert orch.request_cancel(q, "c", "fp", T0).rejected
    assert orch.request_refund(q, "r", "fp", None, T0).rejected


@pytest.mark.parametrize("kind", sorted(SAGAS))
def test_declined_authorization_stays_failed(kind: str) -> None:
    orch = Orchestrator()
    p = payment(kind)
    orch.start(p, kind, T0)
    if kind == "ORDER":
        p, _ = answer(orch, p, only(p))  # reserved
    assert only(p).action == "AUTHORIZE"
    q, eff = answer(orch, p, only(p), success=False)  # declined
    if kind == "ORDER":  # the reservation is released first
        assert [c.action for c in eff.commands] == ["RELEASE"] and not eff.terminal
        q, eff = answer(orch, q, only(q))
    assert eff.terminal and q.saga is not None
    assert q.saga.state == ("COMPENSATED" if kind == "ORDER" else "FAILED")
    assert q.status is S.FAILED and q.authorized_minor == 0
    assert published(q, eff, S.FAILED)["status"] == "FAILED"


@pytest.mark.parametrize("kind", sorted(SAGAS))
def test_authorized_then_voided_is_reversed_not_canceled(kind: str) -> None:
    orch, p = manual_authorized(kind)
    orch.request_cancel(p, "c1", "fp", T0)
    p, eff = answer(orch, p, only(p))  # voided
    if kind == "ORDER":
        p, eff = answer(orch, p, only(p))  # released
    assert eff.terminal and p.saga is not None and p.saga.state == "COMPENSATED"
    assert p.status is S.REVERSED and p.voided_minor == p.authorized_minor > 0
    assert published(p, eff, S.AUTHORIZED)["status"] == "REVERSED"


def test_order_saga_compensated_before_any_authorization_ends_canceled() -> None:
    """A failure answering AUTHORIZE that does not say it declined the authorization (its
    step names another command): nothing was authorized, the reservation is released."""
    orch = Orchestrator()
    p = payment("ORDER")
    orch.start(p, "ORDER", T0)
    p, _ = answer(orch, p, only(p))  # reserved
    o = only(p)
    failure = GatewayOutcome("FAILED", "ev-mislabelled", T0, command_id(o.idempotency_key, 1),
                             step="capture", reason="gateway error")  # fmt: skip
    p, eff = orch.on_outcome(p, "payment", failure, T0)
    assert p.status is S.INITIATED and [c.action for c in eff.commands] == ["RELEASE"]
    p, eff = answer(orch, p, only(p))
    assert eff.terminal and p.saga is not None and p.saga.state == "COMPENSATED"
    assert p.status is S.CANCELED and p.authorized_minor == 0


@pytest.mark.parametrize("kind", sorted(SAGAS))
def test_cancel_request_before_authorization_is_rejected(kind: str) -> None:
    orch = Orchestrator()
    p = payment(kind, "MANUAL")
    orch.start(p, kind, T0)
    before = snapshot(p)
    eff = orch.request_cancel(p, "c1", "fp", T0)
    assert eff.rejected and not eff.commands and not eff.terminal
    assert snapshot(p) == before and p.status is S.INITIATED


@pytest.mark.parametrize(("kind", "silent"), [("PAYMENT", "AUTHORIZE"), ("ORDER", "RESERVE"),
                                              ("ORDER", "AUTHORIZE")])  # fmt: skip
def test_in_doubt_before_authorization_is_not_canceled(kind: str, silent: str) -> None:
    """IN_DOUBT keeps the last known status, INITIATED. After a silent AUTHORIZE the gateway
    may have authorized, so CANCELED could be false. After a silent RESERVE no money moved,
    but the saga did not decide its end either: a human does, and one rule (IN_DOUBT never
    cancels) keeps CANCELED a word paysaga publishes only when it knows."""
    orch = Orchestrator()
    p = payment(kind)
    orch.start(p, kind, T0)
    while only(p).action != silent:
        p, _ = answer(orch, p, only(p))
    eff = silence(orch, p, only(p).idempotency_key)[-1]
    assert eff.terminal and f"{silent} given up after 9 retries" in eff.review[0].reason
    assert p.saga is not None and p.saga.state == "IN_DOUBT" and not p.outstanding
    assert p.status is S.INITIATED and p.authorized_minor == 0
    status = published(p, eff, S.INITIATED)
    assert (status["status"], status["saga_state"], status["terminal"]) == (
        "INITIATED",
        "IN_DOUBT",
        True,
    )


@settings(max_examples=50, deadline=None)
@given(mode=st.sampled_from(["AUTOMATIC", "MANUAL"]), retries=st.integers(0, 5))
def test_order_saga_compensates_in_reverse_when_shipping_fails(mode: str, retries: int) -> None:
    orch = Orchestrator()
    p = payment("ORDER", mode)
    orch.start(p, "ORDER", T0)
    p, _ = answer(orch, p, only(p))  # reserved
    p, _ = answer(orch, p, only(p))  # authorized
    if mode == "MANUAL":
        orch.request_capture(p, "cap", "fp", 600, T0)
    p, _ = answer(orch, p, only(p))  # captured
    captured = p.captured_minor
    assert only(p).action == "CREATE_SHIPMENT"
    p, eff = answer(orch, p, only(p), success=False, retryable=False)
    actions = [c.action for c in eff.commands]
    # compensations fail transiently and are retried at their levels: never early
    for _ in range(retries):
        p, eff = answer(orch, p, only(p), success=False, retryable=True)
        assert (
            not eff.commands
            and eff.retries
            and not orch.on_timeout(p, only(p).deadline - 1).changed
        )
        eff = orch.on_timeout(p, only(p).deadline)
        actions += [c.action for c in eff.commands]
    p, eff = answer(orch, p, only(p))
    actions += [c.action for c in eff.commands]
    p, eff = answer(orch, p, only(p))
    assert actions == ["REFUND"] * (retries + 1) + ["RELEASE"]  # no VOID: it was captured
    assert eff.terminal and eff.commands == []
    assert p.saga is not None and p.saga.state == "COMPENSATED"
    assert p.status is S.REVERSED and p.refunded_minor == captured == p.captured_minor
    assert p.refund_pending_minor == 0 and not p.outstanding
    assert invariant_violations(p) == []


# ---- examples ---------------------------------------------------------------------------


def manual_authorized(kind: str = "PAYMENT") -> tuple[Orchestrator, Payment]:
    orch = Orchestrator()
    p = payment(kind, "MANUAL")
    orch.start(p, kind, T0)
    while p.saga is not None and not p.saga.awaiting_request:
        p, _ = answer(orch, p, only(p))
    return orch, p


def test_manual_partial_capture_releases_the_rest() -> None:
    orch, p = manual_authorized()
    assert p.status is S.AUTHORIZED and not p.outstanding
    assert p.authorized_at is not None
    assert p.auth_expires_at == p.authorized_at + POLICY.auth_window_ms
    eff = orch.request_capture(p, "cap-1", "fp", 250, T0)
    [c] = eff.commands
    assert (c.action, c.amount_minor) == ("CAPTURE", 250)
    p, eff = answer(orch, p, only(p))
    assert eff.terminal and p.saga is not None and p.saga.state == "COMPLETED"
    assert (p.captured_minor, p.released_minor) == (250, p.authorized_minor - 250)
    assert not eff.commands  # the SETTLE goes out with the merchant's batch
    assert eff.settlement is not None and eff.settlement.action == "SETTLE"
    assert eff.settlement.amount_minor == 250


def test_capture_request_over_the_authorization_is_rejected() -> None:
    orch, p = manual_authorized()
    before = snapshot(p)
    for amount in (0, -5, p.authorized_minor + 1):
        eff = orch.request_capture(p, "cap-1", "fp", amount, T0)
        assert eff.rejected and "not within" in eff.rejected and not eff.commands
    assert snapshot(p) == before


def test_auth_expiry_voids_the_authorization() -> None:
    orch, p = manual_authorized()
    due = orch.expiry_due(p)
    assert due is not None
    assert not orch.on_auth_expiry(p, due - 1, T0).changed
    eff = orch.on_auth_expiry(p, due, T0)
    [c] = eff.commands
    assert (c.action, c.role, c.amount_minor) == ("VOID", "compensation", p.authorized_minor)
    assert orch.expiry_due(p) is None
    p, eff = answer(orch, p, only(p))
    assert eff.terminal and p.saga is not None and p.saga.state == "COMPENSATED"
    assert (p.status, p.voided_minor) == (S.REVERSED, p.authorized_minor)
    assert orch.request_capture(p, "late", "fp", None, T0).rejected


def test_order_saga_auth_expiry_voids_then_releases() -> None:
    orch, p = manual_authorized("ORDER")
    eff = orch.on_auth_expiry(p, p.auth_expires_at or 0, T0)
    assert [c.action for c in eff.commands] == ["VOID"]
    p, eff = answer(orch, p, only(p))
    assert [c.action for c in eff.commands] == ["RELEASE"]
    p, eff = answer(orch, p, only(p))
    assert eff.terminal and p.saga is not None and p.saga.state == "COMPENSATED"


def test_cancel_request_voids_and_is_idempotent() -> None:
    orch, p = manual_authorized()
    eff = orch.request_cancel(p, "c1", "fp", T0)
    assert [c.action for c in eff.commands] == ["VOID"]
    assert orch.request_cancel(p, "c1", "fp", T0).replay
    assert orch.request_cancel(p, "c1", "other", T0).conflict
    assert orch.request_cancel(p, "c2", "fp", T0).rejected  # no longer awaiting capture


@pytest.mark.parametrize("kind", sorted(SAGAS))
def test_capture_request_when_not_awaiting_is_rejected(kind: str) -> None:
    orch = Orchestrator()
    p = payment(kind, "AUTOMATIC")
    orch.start(p, kind, T0)
    before = snapshot(p)
    eff = orch.request_capture(p, "cap", "fp", None, T0)
    assert eff.rejected and "no authorization awaits capture" in eff.rejected
    assert not eff.commands and snapshot(p) == before
    # nor on a manual payment still authorizing
    orch, p = Orchestrator(), payment(kind, "MANUAL")
    orch.start(p, kind, T0)
    assert orch.request_capture(p, "cap", "fp", None, T0).rejected


def completed(amount: int = 1000) -> tuple[Orchestrator, Payment]:
    orch = Orchestrator()
    p = payment("PAYMENT", "AUTOMATIC", amount)
    orch.start(p, "PAYMENT", T0)
    p, _ = answer(orch, p, only(p))
    p, _ = answer(orch, p, only(p))
    assert p.saga is not None and p.saga.state == "COMPLETED"
    return orch, p


def test_refund_requests_partial_repeated_and_over_the_refundable_amount() -> None:
    orch, p = completed(1000)
    eff = orch.request_refund(p, "r1", "fp1", 300, T0)
    [c1] = eff.commands
    assert (c1.action, c1.role, c1.amount_minor) == ("REFUND", "request", 300)
    assert p.refund_pending_minor == 300
    # the same request again: a replay, nothing sent; the key with another body: a conflict
    before = snapshot(p)
    assert orch.request_refund(p, "r1", "fp1", 300, T0).replay
    conflict = orch.request_refund(p, "r1", "fp2", 100, T0)
    assert conflict.conflict and not conflict.commands and snapshot(p) == before
    over = orch.request_refund(p, "r2", "fp2", 701, T0)
    assert over.rejected and "exceeds the 700 refundable" in over.rejected
    [c2] = orch.request_refund(p, "r2", "fp2", 700, T0).commands
    assert orch.request_refund(p, "r3", "fp3", 1, T0).rejected  # all of it is pending
    p, _ = answer(orch, p, p.outstanding[c1.idempotency_key])
    assert (p.status, p.refunded_minor, p.refund_pending_minor) == (S.CAPTURED, 300, 700)
    assert p.refunds["r1"].state == "DONE"
    p, _ = answer(orch, p, p.outstanding[c2.idempotency_key], success=False)
    assert (p.refunded_minor, p.refund_pending_minor) == (300, 0)
    assert p.refunds["r2"].state == "FAILED"
    [c3] = orch.request_refund(p, "r3", "fp3", None, T0).commands  # the rest
    assert c3.amount_minor == 700
    p, _ = answer(orch, p, p.outstanding[c3.idempotency_key])
    assert (p.status, p.refunded_minor) == (S.REVERSED, 1000)
    assert orch.request_refund(p, "r4", "fp4", 1, T0).rejected
    assert invariant_violations(p) == []


def test_refund_before_the_saga_completed_is_rejected() -> None:
    orch = Orchestrator()
    p = payment()
    orch.start(p, "PAYMENT", T0)
    eff = orch.request_refund(p, "r1", "fp", 10, T0)
    assert eff.rejected and "nothing captured to refund" in eff.rejected


def test_retry_keeps_the_idempotency_key_with_a_new_command_id() -> None:
    orch = Orchestrator()
    p = payment()
    [first] = orch.start(p, "PAYMENT", T0).commands
    p, eff = answer(orch, p, only(p), success=False, retryable=True)
    assert not eff.commands  # scheduled, not sent: the timer sends it when due
    [second] = orch.on_timeout(p, only(p).deadline).commands
    p, eff = answer(orch, p, only(p), success=False, retryable=True)
    [third] = orch.on_timeout(p, only(p).deadline).commands
    assert first.idempotency_key == second.idempotency_key == third.idempotency_key
    assert len({first.command_id, second.command_id, third.command_id}) == 3
    assert [c.attempt for c in (first, second, third)] == [1, 2, 3]
    assert first.amount_minor == second.amount_minor == third.amount_minor
    assert p.status is S.INITIATED  # a retryable failure changes nothing but the attempt
    assert p.retries == 2
    # an answer to the first attempt still answers the command
    p, eff = answer(orch, p, only(p), attempt=1)
    assert p.status is S.AUTHORIZED and [c.action for c in eff.commands] == ["CAPTURE"]
    with pytest.raises(Unmatched):  # the same command answered twice
        answer(orch, p, only_of(first))


def only_of(c: Command) -> Outstanding:
    return Outstanding(
        idempotency_key=c.idempotency_key,
        service=c.service,
        action=c.action,
        step=c.step,
        role=c.role,
        attempt=c.attempt,
        amount_minor=c.amount_minor,
    )


def transient_until_given_up(orch: Orchestrator, p: Payment, key: str) -> list[Effects]:
    """Answer every attempt under `key` with a 503 and send each scheduled retry when due."""
    out = []
    while key in p.outstanding:
        o = p.outstanding[key]
        if o.phase == WAITING:
            assert not orch.on_timeout(p, o.deadline - 1).changed  # never early
            out.append(orch.on_timeout(p, o.deadline))
        else:
            _, eff = answer(orch, p, o, success=False, retryable=True, now=o.deadline - 1)
            out.append(eff)
        assert len(out) < 100
    return out


def test_transient_failures_retry_by_level_with_the_variant_delays() -> None:
    orch = Orchestrator()
    p = payment()
    orch.start(p, "PAYMENT", T0)
    variant = POLICY.retry.variant(p.retry_variant)
    assert p.retry_variant == POLICY.retry.variant_for(p.customer_id).name
    effs = transient_until_given_up(orch, p, only(p).idempotency_key)
    retries = [r for eff in effs for r in eff.retries]
    # seed 000: 2, 2, 2 and 3 retries at levels 1-4, each at its level's delay
    assert [r.level for r in retries] == [1, 1, 2, 2, 3, 3, 4, 4, 4]
    assert [r.delay_ms for r in retries] == [variant.delays_ms[r.level - 1] for r in retries]
    assert [r.command.attempt for r in retries] == list(range(2, 11))
    assert {r.error_class.value for r in retries} == {"transient"}
    sends = [c for eff in effs for c in eff.commands if c.action == "AUTHORIZE"]
    assert [c.attempt for c in sends] == list(range(2, 11)) and p.retries == 9
    last = effs[-1]
    assert last.terminal and "AUTHORIZE given up after 9 retries" in last.review[0].reason
    assert last.review_class.value == "transient"
    assert p.saga is not None and p.saga.state == "FAILED" and p.status is S.FAILED


def test_a_transient_failure_recovers_at_level_two() -> None:
    orch = Orchestrator()
    p = payment()
    orch.start(p, "PAYMENT", T0)
    levels = []
    for _ in range(3):
        p, eff = answer(orch, p, only(p), success=False, retryable=True)
        levels += [r.level for r in eff.retries]
        orch.on_timeout(p, only(p).deadline)
    p, eff = answer(orch, p, only(p))
    assert levels == [1, 1, 2] and p.status is S.AUTHORIZED and only(p).action == "CAPTURE"


def test_permanent_failures_are_never_retried() -> None:
    orch = Orchestrator()
    p = payment()
    orch.start(p, "PAYMENT", T0)
    p, eff = answer(orch, p, only(p), success=False, retryable=False)  # declined
    assert not eff.retries and not eff.commands and eff.terminal
    assert p.status is S.FAILED and p.retries == 0
    orch, p = manual_authorized()
    orch.request_cancel(p, "c", "fp", T0)  # the VOID fails permanently: a human decides
    p, eff = answer(orch, p, only(p), success=False, retryable=False)
    assert not eff.retries and eff.terminal and eff.review and eff.review_class.value == "permanent"
    assert p.saga is not None and p.saga.state == "IN_DOUBT" and p.status is S.AUTHORIZED


def test_no_answer_is_resolved_by_an_inquiry_without_a_second_authorization() -> None:
    orch = Orchestrator()
    p = payment()
    [auth] = orch.start(p, "PAYMENT", T0).commands
    [inquiry] = orch.on_timeout(p, only(p).deadline).commands
    assert (inquiry.action, inquiry.idempotency_key) == ("INQUIRE", auth.idempotency_key)
    assert inquiry.command_id == inquiry_id(auth.idempotency_key, 1) != auth.command_id
    assert only(p).phase == INQUIRING
    # the gateway replays what it recorded for the key: the answer to attempt 1
    p, eff = answer(orch, p, only(p), attempt=1)
    assert p.status is S.AUTHORIZED and [c.action for c in eff.commands] == ["CAPTURE"]
    assert p.retries == 0


def test_a_key_the_gateway_never_saw_is_retried_with_the_same_key() -> None:
    orch = Orchestrator()
    p = payment()
    [auth] = orch.start(p, "PAYMENT", T0).commands
    orch.on_timeout(p, only(p).deadline)  # inquiry 1
    unseen = GatewayOutcome(kind="FAILED", event_id="ev-unseen", occurred_at=T0,
                            command_id=inquiry_id(auth.idempotency_key, 1), step=INQUIRY_STEP,
                            code=NEVER_SEEN, reason="never seen", retryable=True)  # fmt: skip
    p, eff = orch.on_outcome(p, "payment", unseen, T0 + 10_000)
    [r] = eff.retries
    assert not eff.commands and (r.command.action, r.command.attempt, r.level) == (
        "AUTHORIZE",
        2,
        1,
    )
    [again] = orch.on_timeout(p, only(p).deadline).commands
    assert (again.idempotency_key, again.attempt) == (auth.idempotency_key, 2)
    # a late answer to that inquiry changes nothing
    before = snapshot(p)
    p, eff = orch.on_outcome(p, "payment", unseen, T0 + 20_000)
    assert snapshot(p) == before and not eff.commands and not eff.retries


def test_exhausted_timeouts_put_the_saga_in_doubt() -> None:
    orch = Orchestrator()
    p = payment()
    orch.start(p, "PAYMENT", T0)
    effs = silence(orch, p, only(p).idempotency_key)
    sent_ = [c for eff in effs for c in eff.commands]
    # no answer: ask, then ask again at each level; the command is never sent twice blind
    assert {c.action for c in sent_} == {"INQUIRE"} and len(sent_) == 10
    assert all(not eff.review for eff in effs[:-1])
    eff = effs[-1]
    assert (
        eff.terminal
        and eff.review
        and "AUTHORIZE given up after 9 retries (unknown)" in eff.review[0].reason
    )
    assert eff.review_class.value == "unknown"
    assert p.saga is not None and p.saga.state == "IN_DOUBT" and not p.outstanding
    assert not orch.on_timeout(p, T0 + 10**9).changed


def test_exhausted_compensation_puts_the_saga_in_doubt() -> None:
    orch, p = manual_authorized()
    orch.request_cancel(p, "c", "fp", T0)
    effs = transient_until_given_up(orch, p, only(p).idempotency_key)
    assert not any(eff.terminal for eff in effs[:-1])
    eff = effs[-1]
    assert eff.terminal and eff.review and p.saga is not None and p.saga.state == "IN_DOUBT"
    assert p.status is S.AUTHORIZED  # the money stays where it is, for a human to decide


def test_exhausted_refund_timeout_is_reviewed_without_ending_anything() -> None:
    orch, p = completed()
    p, _ = answer(orch, p, by_action(p, "SETTLE"))
    [c] = orch.request_refund(p, "r1", "fp", 100, T0).commands
    eff = silence(orch, p, c.idempotency_key)[-1]
    assert [r.reason for r in eff.review] == [
        "REFUND given up after 9 retries (unknown): no answer to INQUIRE within 10000 ms; "
        "outcome unknown"]  # fmt: skip
    assert [r.doubt for r in eff.review] == [c.idempotency_key]
    assert p.saga is not None
    assert not eff.terminal and not p.outstanding and p.saga.state == "COMPLETED"
    assert p.refunds["r1"].state == "IN_DOUBT" and p.refund_pending_minor == 100


def test_unmatched_and_misdirected_outcomes_change_nothing() -> None:
    orch = Orchestrator()
    p = payment()
    orch.start(p, "PAYMENT", T0)
    o, before = only(p), snapshot(p)
    good = command_id(o.idempotency_key, 1)
    for service, cid in (
        ("payment", None),
        ("payment", "nope"),
        ("inventory", good),
        ("payment", command_id(o.idempotency_key, 2)),
    ):
        with pytest.raises(Unmatched):
            orch.on_outcome(p, service, GatewayOutcome("AUTHORIZED", "e", T0, cid, 1000), T0)
    with pytest.raises(InvalidTransition):
        orch.on_outcome(p, "payment", GatewayOutcome("CAPTURED", "e", T0, good, 1000), T0)
    with pytest.raises(InvalidTransition):  # authorized more than requested
        orch.on_outcome(p, "payment", GatewayOutcome("AUTHORIZED", "e", T0, good, 1001), T0)
    assert snapshot(p) == before


def test_definitions() -> None:
    assert [s.action for s in PAYMENT_SAGA.steps] == ["AUTHORIZE", "CAPTURE"]
    assert [s.action for s in ORDER_SAGA.steps] == [
        "RESERVE",
        "AUTHORIZE",
        "CAPTURE",
        "CREATE_SHIPMENT",
    ]
    assert ORDER_SAGA.index("capture") == 2
    with pytest.raises(ValueError, match="unknown saga"):
        Orchestrator().start(payment(), "NOPE", T0)


# ---- findings ---------------------------------------------------------------------------


def test_settlement_after_a_full_refund_is_accepted() -> None:
    """Whatever refunds upstream asks for meanwhile, the SETTLE the saga sent can complete."""
    orch, p = completed(1000)
    settle = by_action(p, "SETTLE")
    eff = orch.request_refund(p, "r1", "fp", None, T0)  # all of it, before settlement
    for c in eff.commands:
        p, _ = answer(orch, p, p.outstanding[c.idempotency_key])
    # today: InvalidTransition "SETTLED is not allowed in status REVERSED"; the SETTLE stays
    # outstanding, every retry's answer is refused the same way, and after the last timeout
    # the record says "no answer to SETTLE ... outcome unknown" although answers came.
    p, _ = answer(orch, p, settle)
    assert not p.outstanding and invariant_violations(p) == []


def test_a_settlement_the_gateway_reports_after_the_saga_gave_up_still_settles() -> None:
    """The batch's SETTLE (attempt 1) can reach the gateway after the saga's own retries
    ran out (its batch went out late): the gateway's SETTLED is a fact, and it settles the
    payment; a SETTLED answering another payment's command is still refused."""
    orch, p = completed(1000)
    settle = by_action(p, "SETTLE")
    first = settle.model_copy()
    eff = transient_until_given_up(orch, p, settle.idempotency_key)[-1]
    assert not p.outstanding and eff.review  # gave up: reviewed
    assert p.status is S.CAPTURED
    late = GatewayOutcome(kind="SETTLED", event_id="ev-late", occurred_at=T0 + 5_000,
                          command_id=command_id(first.idempotency_key, 1),
                          amount_minor=1000)  # fmt: skip
    p, eff = orch.on_outcome(p, "payment", late, T0 + 5_000)
    assert p.status is S.SETTLED and "given up before: no longer in doubt" in eff.notes[0]
    assert not p.doubts and not p.outstanding and "settled" in eff.notes
    other = GatewayOutcome(kind="SETTLED", event_id="ev-x", occurred_at=T0, amount_minor=1000,
                           command_id=command_id("pay-other:settle:post", 1))  # fmt: skip
    with pytest.raises(Unmatched):
        orch.on_outcome(p, "payment", other, T0)
