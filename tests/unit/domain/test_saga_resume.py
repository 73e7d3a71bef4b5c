"""In doubt is not the end: a command whose retries ran out is kept in the payment, so a
late answer resolves it and an operator's resume (a redriven review letter) takes it up
again with the same key, once (docs/retries.md#in-doubt-is-not-the-end)."""

from __future__ import annotations

import pytest

from paysaga.domain.lifecycle import GatewayOutcome, InvalidTransition, invariant_violations
from paysaga.domain.payment import Outstanding, Payment, PaymentStatus
from paysaga.domain.retry import INQUIRY_STEP, NEVER_SEEN
from paysaga.domain.saga import INQUIRING, Effects, Orchestrator, Unmatched, command_id, inquiry_id
from tests.unit.domain.test_saga import (
    T0,
    answer,
    by_action,
    completed,
    manual_authorized,
    only,
    payment,
    silence,
    snapshot,
    transient_until_given_up,
)

S = PaymentStatus


def in_doubt(kind: str = "PAYMENT") -> tuple[Orchestrator, Payment, Outstanding, Effects]:
    """A saga whose AUTHORIZE went unanswered through every retry level: IN_DOUBT."""
    orch = Orchestrator()
    p = payment(kind)
    orch.start(p, kind, T0)
    key = only(p).idempotency_key
    eff = silence(orch, p, key)[-1]
    assert p.saga is not None and p.saga.state == "IN_DOUBT" and eff.terminal
    return orch, p, p.doubts[key], eff


def state(p: Payment) -> str:
    assert p.saga is not None
    return p.saga.state


def resume(orch: Orchestrator, p: Payment, o: Outstanding, now: int = T0 + 10**7) -> Effects:
    return orch.resume(p, o.idempotency_key, o.attempt, o.inquiries, now)


def test_a_command_given_up_in_doubt_is_kept_and_named_by_its_review() -> None:
    orch, p, doubt, eff = in_doubt()
    [review] = eff.review
    assert review.doubt == doubt.idempotency_key and "given up after 9 retries" in review.reason
    assert not p.outstanding and (doubt.action, doubt.attempt, doubt.inquiries) == (
        "AUTHORIZE", 1, 10)  # fmt: skip
    assert orch.next_deadline(p) is None  # nothing is armed for a doubt: it waits for a human


def test_a_resume_asks_the_gateway_first_then_the_saga_goes_on_from_where_it_was() -> None:
    orch, p, doubt, _ = in_doubt()
    key, retries = doubt.idempotency_key, p.retries
    eff = resume(orch, p, doubt)
    sends = list(eff.commands)
    [inquiry] = eff.commands
    assert (inquiry.action, inquiry.idempotency_key) == ("INQUIRE", key)
    assert inquiry.command_id == inquiry_id(key, 11)
    assert p.saga is not None and p.saga.state == "RUNNING" and eff.reopened
    assert not eff.terminal and not p.doubts and only(p).phase == INQUIRING
    assert only(p).retries == 0 and p.retries == retries  # a fresh budget; an inquiry is no resend
    # the gateway acted on the first attempt after all: it replays that answer
    p, eff = answer(orch, p, only(p), attempt=1)
    sends += eff.commands
    assert p.status is S.AUTHORIZED and [c.action for c in eff.commands] == ["CAPTURE"]
    p, eff = answer(orch, p, only(p))
    assert state(p) == "COMPLETED" and eff.terminal and invariant_violations(p) == []
    assert "AUTHORIZE" not in [c.action for c in sends]  # never authorized twice


def test_a_key_the_gateway_never_saw_is_sent_again_with_the_same_key_after_a_resume() -> None:
    orch, p, doubt, _ = in_doubt()
    key = doubt.idempotency_key
    [inquiry] = resume(orch, p, doubt).commands
    unseen = GatewayOutcome(kind="FAILED", event_id="ev-unseen", occurred_at=T0,
                            command_id=inquiry.command_id, step=INQUIRY_STEP, code=NEVER_SEEN,
                            reason="never seen", retryable=True)  # fmt: skip
    p, eff = orch.on_outcome(p, "payment", unseen, T0 + 10**7)
    [r] = eff.retries
    assert r.level == 1 and (r.command.action, r.command.attempt) == ("AUTHORIZE", 2)
    [again] = orch.on_timeout(p, only(p).deadline).commands
    assert (again.idempotency_key, again.attempt) == (key, 2)


def test_a_resume_is_applied_once() -> None:
    orch, p, doubt, _ = in_doubt()
    stale = doubt.model_copy()
    assert resume(orch, p, doubt).commands
    before = snapshot(p)
    again = resume(orch, p, stale)
    assert again.replay and not again.commands and not again.terminal
    assert "not in doubt any more" in again.notes[0]
    assert snapshot(p) == before
    # a resume naming another doubt than the one kept (an older letter) changes nothing
    orch2, p2, doubt2, _ = in_doubt()
    before = snapshot(p2)
    eff = orch2.resume(p2, doubt2.idempotency_key, doubt2.attempt, doubt2.inquiries - 1, T0)
    assert eff.replay and snapshot(p2) == before


def test_a_resumed_command_given_up_again_is_a_new_doubt_with_its_own_identity() -> None:
    orch, p, doubt, _ = in_doubt()
    first = (doubt.attempt, doubt.inquiries)
    orch.resume(p, doubt.idempotency_key, *first, T0, redrive={"paysaga.redrive.count": "1"})
    eff = silence(orch, p, doubt.idempotency_key)[-1]
    again = p.doubts[doubt.idempotency_key]
    assert eff.terminal and eff.review[0].doubt == doubt.idempotency_key
    assert (again.attempt, again.inquiries) != first and again.redrive == {
        "paysaga.redrive.count": "1"}  # fmt: skip
    assert p.saga is not None and p.saga.state == "IN_DOUBT"


def test_a_late_answer_resolves_the_doubt_without_an_operator() -> None:
    orch, p, doubt, _ = in_doubt()
    p, eff = answer(orch, p, doubt, attempt=1)
    assert p.status is S.AUTHORIZED and eff.reopened and not p.doubts
    assert "given up before: no longer in doubt" in eff.notes[0]
    assert p.saga is not None and p.saga.state == "RUNNING"
    assert [c.action for c in eff.commands] == ["CAPTURE"]


def test_a_late_retryable_failure_or_a_wrong_answer_changes_nothing() -> None:
    orch, p, doubt, _ = in_doubt()
    before = snapshot(p)
    with pytest.raises(Unmatched, match="dlq redrive"):
        answer(orch, p, doubt, success=False, retryable=True)
    assert snapshot(p) == before
    # an answer the payment refuses (a capture before any authorization): unchanged too
    capture = GatewayOutcome(kind="CAPTURED", event_id="ev-c", occurred_at=T0, amount_minor=1000,
                             command_id=command_id(doubt.idempotency_key, 1))  # fmt: skip
    with pytest.raises(InvalidTransition):
        orch.on_outcome(p, "payment", capture, T0)
    assert snapshot(p) == before


def test_an_inquiry_answer_after_the_saga_gave_up_resolves_nothing() -> None:
    orch, p, doubt, _ = in_doubt()
    unseen = GatewayOutcome(kind="FAILED", event_id="ev-u", occurred_at=T0, step=INQUIRY_STEP,
                            command_id=inquiry_id(doubt.idempotency_key, doubt.inquiries),
                            code=NEVER_SEEN, reason="never seen", retryable=True)  # fmt: skip
    before = snapshot(p)
    with pytest.raises(Unmatched):
        orch.on_outcome(p, "payment", unseen, T0)
    assert snapshot(p) == before


def test_a_compensation_given_up_resumes_compensating() -> None:
    orch, p = manual_authorized()
    orch.request_cancel(p, "c", "fp", T0)
    key = only(p).idempotency_key
    transient_until_given_up(orch, p, key)
    assert p.saga is not None and p.saga.state == "IN_DOUBT"
    doubt = p.doubts[key]
    eff = resume(orch, p, doubt)
    assert p.saga.state == "COMPENSATING" and eff.reopened
    assert [c.action for c in eff.commands] == ["INQUIRE"]
    p, eff = answer(orch, p, only(p), attempt=1)  # the VOID went through the first time
    assert p.status is S.REVERSED and eff.terminal and state(p) == "COMPENSATED"


def test_a_refund_in_doubt_resumes_and_ends_done() -> None:
    orch, p = completed()
    p, _ = answer(orch, p, by_action(p, "SETTLE"))
    [c] = orch.request_refund(p, "r1", "fp", 100, T0).commands
    silence(orch, p, c.idempotency_key)
    assert p.refunds["r1"].state == "IN_DOUBT"
    eff = resume(orch, p, p.doubts[c.idempotency_key])
    assert p.refunds["r1"].state == "PENDING" and not eff.reopened  # the saga had not ended
    p, eff = answer(orch, p, only(p), attempt=1)
    assert p.refunds["r1"].state == "DONE" and p.refunded_minor == 100
    assert p.refund_pending_minor == 0 and invariant_violations(p) == []


def test_a_settlement_given_up_is_resumed_by_an_inquiry() -> None:
    orch, p = completed()
    key = by_action(p, "SETTLE").idempotency_key
    transient_until_given_up(orch, p, key)
    eff = resume(orch, p, p.doubts[key])
    assert [c.action for c in eff.commands] == ["INQUIRE"] and not eff.reopened
    p, eff = answer(orch, p, only(p), attempt=1)
    assert p.status is S.SETTLED and not p.doubts


def test_an_order_service_command_given_up_is_sent_again_not_asked_about() -> None:
    orch, p = manual_authorized("ORDER")
    orch.request_cancel(p, "c", "fp", T0)
    p, _ = answer(orch, p, only(p))  # voided: now the inventory release
    release = only(p)
    assert release.service == "inventory"
    silence(orch, p, release.idempotency_key)
    doubt = p.doubts[release.idempotency_key]
    attempts = doubt.attempt
    [again] = resume(orch, p, doubt).commands
    assert (again.action, again.idempotency_key, again.attempt) == (
        "RELEASE", release.idempotency_key, attempts + 1)  # fmt: skip


def test_a_step_failed_after_transient_retries_keeps_no_doubt() -> None:
    """Transient all the way: the gateway said each time it could not act, so the saga
    failed its step and compensated; there is nothing to resume."""
    orch = Orchestrator()
    p = payment()
    orch.start(p, "PAYMENT", T0)
    eff = transient_until_given_up(orch, p, only(p).idempotency_key)[-1]
    assert [r.doubt for r in eff.review] == [None] and not p.doubts


def test_an_inquiry_shaped_answer_carrying_an_attempts_id_resolves_nothing() -> None:
    """A "never seen" that names an attempt (not an inquiry) of a command given up: the
    gateway says it did nothing, which is for the operator; the doubt stays as it was."""
    orch, p, doubt, _ = in_doubt()
    odd = GatewayOutcome(kind="FAILED", event_id="ev-odd", occurred_at=T0, step=INQUIRY_STEP,
                         command_id=command_id(doubt.idempotency_key, 1), code=NEVER_SEEN,
                         reason="never seen", retryable=True)  # fmt: skip
    before = snapshot(p)
    with pytest.raises(Unmatched, match="never_seen"):
        orch.on_outcome(p, "payment", odd, T0)
    assert snapshot(p) == before


def test_the_resume_of_a_refund_with_a_long_upstream_key_is_valid_input() -> None:
    """A refund command's key is the payment id, `:refund:` and upstream's key (up to
    255): its resume must pass the saga's own input validation."""
    from paysaga.agents.outputs import resume_record
    from paysaga.schemas.events import SagaResume

    orch, p = completed()
    p, _ = answer(orch, p, by_action(p, "SETTLE"))
    long_key = "k" * 255
    [c] = orch.request_refund(p, long_key, "fp", 100, T0).commands
    silence(orch, p, c.idempotency_key)
    record = resume_record(p, p.doubts[c.idempotency_key], "cause", T0, "unknown",
                           "card 4242 4242 4242 4242 in a reason")  # fmt: skip
    resume = SagaResume.model_validate(record)
    assert resume.idempotency_key == c.idempotency_key and len(c.idempotency_key) > 255
    assert "4242 4242" not in resume.reason  # reasons are redacted like the headers
