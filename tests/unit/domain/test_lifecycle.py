"""The payment state machine: random gateway outcome sequences never break a money rule.

`transition` either returns a new, sound payment or raises InvalidTransition and leaves the
payment it was given untouched. The property test checks every step against a small
reference model of which outcome each status admits (and, now and then, the end of a saga:
`cancel_if_no_money_moved`); the examples pin the named paths.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from paysaga.domain.lifecycle import (
    TERMINAL,
    GatewayOutcome,
    InvalidTransition,
    cancel_if_no_money_moved,
    invariant_violations,
    transition,
)
from paysaga.domain.payment import Payment, PaymentStatus, initiate
from paysaga.schemas.models import PaymentInitiated
from tests.samples import initiated

S = PaymentStatus
KINDS = ("AUTHORIZED", "CAPTURED", "FAILED", "VOIDED", "REFUNDED", "SETTLED")
STEPS = (None, "authorize", "capture", "void", "refund", "settle")
_SAMPLE = initiated(1)[0]
_ids = itertools.count(1)


def payment(amount: int = 1000, **overrides: object) -> Payment:
    return initiate(
        PaymentInitiated.model_validate({**_SAMPLE, "amount_minor": amount, **overrides})
    )


def outcome(kind: str, amount: int = 0, step: str | None = None) -> GatewayOutcome:
    n = next(_ids)
    return GatewayOutcome(
        kind=kind,
        event_id=f"e{n}",
        occurred_at=1_700_000_000_000 + n,
        amount_minor=amount,
        step=step,
    )


def apply(p: Payment, *outcomes: GatewayOutcome) -> Payment:
    for o in outcomes:
        p = transition(p, o)
        assert invariant_violations(p) == []
    return p


def allowed(p: Payment, o: GatewayOutcome) -> bool:
    """Reference model: does the state machine accept `o` in `p`'s state?"""
    kind, amount, status = o.kind, o.amount_minor, p.status
    if kind == "FAILED":
        return status not in (S.FAILED, S.CANCELED)
    if amount <= 0:
        return False
    if kind == "AUTHORIZED":
        return status is S.INITIATED and amount <= p.amount_minor
    if kind in ("CAPTURED", "VOIDED"):
        return status is S.AUTHORIZED and amount <= p.authorized_minor - p.captured_minor
    if kind == "REFUNDED":
        return (
            p.captured_minor > 0
            and status in (S.CAPTURED, S.SETTLED, S.REVERSED)
            and amount <= p.captured_minor - p.refunded_minor
        )
    assert kind == "SETTLED"  # a payment refunded in full before settling still settles
    return status in (S.CAPTURED, S.REVERSED) and 0 < amount <= p.captured_minor


def interesting_amounts(p: Payment) -> st.SearchStrategy[int]:
    """Amounts near every boundary the payment's state defines, and some random ones."""
    edges = {
        p.amount_minor,
        p.authorized_minor,
        p.authorized_minor - p.captured_minor,
        p.captured_minor,
        p.captured_minor - p.refunded_minor,
        1,
        0,
        -1,
    }
    near = sorted({e + d for e in edges for d in (-1, 0, 1)})
    return st.one_of(st.sampled_from(near), st.integers(-5, p.amount_minor + 5))


#: Outcomes each status may admit (the real rule is `allowed`; this only steers generation).
LIKELY = {
    S.INITIATED: ("AUTHORIZED", "AUTHORIZED", "FAILED"),
    S.AUTHORIZED: ("CAPTURED", "CAPTURED", "VOIDED"),
    S.CAPTURED: ("REFUNDED", "SETTLED"),
    S.SETTLED: ("REFUNDED",),
    S.REVERSED: ("REFUNDED",),
    S.FAILED: KINDS,
    S.CANCELED: KINDS,
}
MONEY = ("authorized_minor", "captured_minor", "released_minor", "voided_minor", "refunded_minor")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(amount=st.integers(1, 40), data=st.data())
def test_random_outcome_sequences_keep_every_money_rule(amount: int, data: st.DataObject) -> None:
    p = payment(amount)
    assert invariant_violations(p) == []
    for _ in range(data.draw(st.integers(1, 25), label="length")):
        if data.draw(st.integers(0, 9), label="saga ends") == 0:
            q = p.model_copy(deep=True)
            moved = cancel_if_no_money_moved(q)
            assert moved == (p.status is S.INITIATED), p.status
            assert q.status is (S.CANCELED if moved else p.status)
            assert {n: getattr(q, n) for n in MONEY} == {n: getattr(p, n) for n in MONEY}
            assert invariant_violations(q) == []
            event(f"saga ends: {p.status.value} -> {q.status.value}")
            p = q
            continue
        # half the time a kind the status admits, else any: deep paths get explored too
        kind = data.draw(st.sampled_from(KINDS) | st.sampled_from(LIKELY[p.status]), label="kind")
        o = outcome(
            kind,
            data.draw(interesting_amounts(p), label="amount"),
            data.draw(st.sampled_from(STEPS), label="step"),
        )
        before = p.model_dump()
        try:
            q = transition(p, o)
        except InvalidTransition as exc:
            assert str(exc)  # the message is the reason, never empty
            assert p.model_dump() == before, "a refused outcome must not touch the payment"
            assert not allowed(p, o), f"{o} refused in {p.status}: {exc}"
            continue
        assert p.model_dump() == before, "transition must not mutate its input"
        assert q is not p
        assert allowed(p, o), f"{o} accepted in {p.status} -> {q.status}"
        event(f"{kind}: {p.status.value} -> {q.status.value}")
        assert invariant_violations(q) == []
        assert 0 <= q.captured_minor <= q.authorized_minor <= q.amount_minor
        assert 0 <= q.refunded_minor <= q.captured_minor
        for name in MONEY:  # money already moved never moves back
            assert getattr(q, name) >= getattr(p, name), name
        if p.status in (S.FAILED, S.CANCELED):
            pytest.fail(f"nothing may follow {p.status.value}")
        if p.status in TERMINAL and q.status != p.status:
            # the only way out of SETTLED is a full refund; nothing leaves REVERSED
            assert (p.status, q.status, kind) == (S.SETTLED, S.REVERSED, "REFUNDED")
        if p.status in TERMINAL:
            # a refund, or the settlement of a payment refunded before it settled
            assert kind in ("REFUNDED", "FAILED", "SETTLED"), f"{kind} moved terminal {p.status}"
            changed = {n for n in MONEY if getattr(q, n) != getattr(p, n)}
            assert changed <= {"refunded_minor"}
        if kind == "REFUNDED":
            assert q.refunded_minor == p.refunded_minor + o.amount_minor
            assert (q.status is S.REVERSED) == (q.refunded_minor == q.captured_minor)
        if kind == "CAPTURED":
            assert q.captured_minor == o.amount_minor
            assert q.released_minor == q.authorized_minor - q.captured_minor
        p = q


# ---- examples ---------------------------------------------------------------------------


def test_happy_path_initiated_to_settled() -> None:
    p = payment(1000)
    assert p.status is S.INITIATED
    p = apply(p, outcome("AUTHORIZED", 1000))
    assert (p.status, p.authorized_minor) == (S.AUTHORIZED, 1000)
    assert p.authorized_at is not None
    p = apply(p, outcome("CAPTURED", 1000))
    assert (p.status, p.captured_minor, p.released_minor) == (S.CAPTURED, 1000, 0)
    p = apply(p, outcome("SETTLED", 1000))
    assert p.status is S.SETTLED


def test_partial_capture_releases_the_rest_of_the_authorization() -> None:
    p = apply(payment(1000), outcome("AUTHORIZED", 800), outcome("CAPTURED", 300))
    assert (p.status, p.authorized_minor, p.captured_minor, p.released_minor) == (
        S.CAPTURED,
        800,
        300,
        500,
    )
    with pytest.raises(InvalidTransition, match="not allowed in status CAPTURED"):
        transition(p, outcome("CAPTURED", 100))  # the authorization is closed
    with pytest.raises(InvalidTransition, match="not allowed in status CAPTURED"):
        transition(p, outcome("VOIDED", 500))  # the rest was released, not voidable


def test_partial_then_full_refund_reverses() -> None:
    p = apply(payment(1000), outcome("AUTHORIZED", 1000), outcome("CAPTURED", 1000))
    p = apply(p, outcome("REFUNDED", 400))
    assert (p.status, p.refunded_minor) == (S.CAPTURED, 400)
    with pytest.raises(InvalidTransition, match="exceeds the 600 not yet refunded"):
        transition(p, outcome("REFUNDED", 601))
    p = apply(p, outcome("REFUNDED", 600))
    assert (p.status, p.refunded_minor) == (S.REVERSED, 1000)
    with pytest.raises(InvalidTransition):
        transition(p, outcome("REFUNDED", 1))


def test_refund_after_settlement() -> None:
    p = apply(
        payment(500),
        outcome("AUTHORIZED", 500),
        outcome("CAPTURED", 500),
        outcome("SETTLED", 500),
        outcome("REFUNDED", 200),
    )
    assert (p.status, p.refunded_minor) == (S.SETTLED, 200)
    p = apply(p, outcome("REFUNDED", 300))
    assert p.status is S.REVERSED


def test_refund_clears_pending_refunds() -> None:
    p = apply(payment(500), outcome("AUTHORIZED", 500), outcome("CAPTURED", 500))
    p.refund_pending_minor = 500
    p = apply(p, outcome("REFUNDED", 200))
    assert (p.refunded_minor, p.refund_pending_minor) == (200, 300)


def test_void_after_capture_is_rejected() -> None:
    p = apply(payment(1000), outcome("AUTHORIZED", 1000), outcome("CAPTURED", 1000))
    before = p.model_dump()
    with pytest.raises(InvalidTransition, match="VOIDED is not allowed in status CAPTURED"):
        transition(p, outcome("VOIDED", 1000))
    assert p.model_dump() == before


def test_void_reverses_an_authorization() -> None:
    p = apply(payment(1000), outcome("AUTHORIZED", 700), outcome("VOIDED", 700))
    assert (p.status, p.voided_minor, p.captured_minor) == (S.REVERSED, 700, 0)
    with pytest.raises(InvalidTransition):
        transition(p, outcome("CAPTURED", 1))


def test_capture_of_more_than_authorized_is_rejected() -> None:
    p = apply(payment(1000), outcome("AUTHORIZED", 600))
    before = p.model_dump()
    with pytest.raises(InvalidTransition, match="capture of 601 exceeds the 600 authorized"):
        transition(p, outcome("CAPTURED", 601))
    assert p.model_dump() == before
    assert apply(p, outcome("CAPTURED", 600)).captured_minor == 600


def test_authorization_of_more_than_requested_is_rejected() -> None:
    with pytest.raises(InvalidTransition, match="authorized 1001 is more than the 1000"):
        transition(payment(1000), outcome("AUTHORIZED", 1001))


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "FAILED"])
@pytest.mark.parametrize("amount", [0, -1])
def test_non_positive_amounts_are_rejected(kind: str, amount: int) -> None:
    with pytest.raises(InvalidTransition, match="non-positive amount"):
        transition(payment(), outcome(kind, amount))


@pytest.mark.parametrize("amount", [True, 1.5])
def test_non_integer_amounts_never_reach_the_record(amount: object) -> None:
    with pytest.raises(InvalidTransition, match="non-negative integer"):
        transition(payment(), outcome("AUTHORIZED", amount))  # type: ignore[arg-type]


def test_declined_authorization_fails_and_nothing_follows() -> None:
    p = apply(payment(), outcome("FAILED", step="authorize"))
    assert p.status is S.FAILED
    for kind in KINDS:
        with pytest.raises(InvalidTransition):
            transition(p, outcome(kind, 1, step="authorize"))


def test_a_saga_ending_with_nothing_authorized_cancels_and_nothing_follows() -> None:
    p = payment(1000)
    assert cancel_if_no_money_moved(p) and p.status is S.CANCELED
    assert (p.authorized_minor, p.captured_minor, p.refunded_minor) == (0, 0, 0)
    assert invariant_violations(p) == [] and p.status in TERMINAL
    assert not cancel_if_no_money_moved(p)  # already canceled: nothing changes
    for kind in KINDS:
        with pytest.raises(InvalidTransition):
            transition(p, outcome(kind, 1000, step="authorize"))


@pytest.mark.parametrize(
    ("outcomes", "status"),
    [
        ((("FAILED", 0, "authorize"),), S.FAILED),  # declined: FAILED stays FAILED
        ((("AUTHORIZED", 1000, None),), S.AUTHORIZED),
        ((("AUTHORIZED", 1000, None), ("VOIDED", 1000, None)), S.REVERSED),  # voided
        ((("AUTHORIZED", 1000, None), ("CAPTURED", 400, None)), S.CAPTURED),
        (
            (("AUTHORIZED", 1000, None), ("CAPTURED", 1000, None), ("REFUNDED", 1000, None)),
            S.REVERSED,
        ),
    ],
)
def test_only_a_payment_with_nothing_authorized_is_canceled(
    outcomes: tuple[tuple[str, int, str | None], ...], status: PaymentStatus
) -> None:
    p = apply(payment(1000), *(outcome(*o) for o in outcomes))
    before = p.model_dump()
    assert not cancel_if_no_money_moved(p)
    assert p.status is status and p.model_dump() == before


def test_canceled_amounts_must_be_zero() -> None:
    p = apply(payment(1000), outcome("AUTHORIZED", 1000), outcome("VOIDED", 1000))
    p.status = S.CANCELED  # what cancel_if_no_money_moved refuses to do
    assert "amounts inconsistent with status CANCELED" in invariant_violations(p)


@pytest.mark.parametrize("step", ["capture", "void", "refund", "settle"])
def test_a_failed_later_command_leaves_the_money_where_it_is(step: str) -> None:
    p = apply(payment(1000), outcome("AUTHORIZED", 1000))
    q = apply(p, outcome("FAILED", step=step))
    assert q.model_dump() == p.model_dump()


def test_unknown_outcome_is_rejected() -> None:
    with pytest.raises(InvalidTransition, match="unknown outcome"):
        transition(payment(), outcome("CHARGEBACK", 10))


def test_invariant_violations_names_broken_rules() -> None:
    p = apply(payment(1000), outcome("AUTHORIZED", 1000), outcome("CAPTURED", 1000))
    p.refunded_minor = 1001
    problems = invariant_violations(p)
    assert "refunded (incl. pending) exceeds captured" in problems
    p = payment(1000)
    p.captured_minor = 5
    assert "captured exceeds authorized" in invariant_violations(p)
