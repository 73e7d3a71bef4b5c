"""The payment state machine: which gateway outcome may change a payment, and how.

INITIATED -> AUTHORIZED -> CAPTURED -> SETTLED, with FAILED (authorization declined),
REVERSED (voided, or refunded in full) and CANCELED (the saga ended before any money moved:
`cancel_if_no_money_moved`, the one move no gateway outcome causes). A partial refund keeps
the status and raises `refunded_minor`; a partial capture releases the rest of the
authorization. An outcome that would break an invariant is refused with a reason and never
applied (`InvalidTransition`).

Pure module: no Faust or Kafka. `invariant_violations` is the single statement of the
money rules (docs/contract.md#payment-state-and-invariants); the saga agent checks it before
every write, the property tests after every step.
"""

from __future__ import annotations

from dataclasses import dataclass

from paysaga.domain.payment import Payment, PaymentStatus

S = PaymentStatus

#: Statuses out of which nothing moves, except a refund after capture or settlement.
TERMINAL = frozenset({S.SETTLED, S.FAILED, S.REVERSED, S.CANCELED})


class InvalidTransition(ValueError):
    """A lifecycle outcome the payment's state does not allow. The message is the reason."""


@dataclass(frozen=True)
class GatewayOutcome:
    """A card gateway's answer, as the domain sees it (decoded and validated already)."""

    kind: str  # AUTHORIZED | CAPTURED | FAILED | VOIDED | REFUNDED | SETTLED
    event_id: str
    occurred_at: int
    command_id: str | None = None
    amount_minor: int = 0
    step: str | None = None  # FAILED: which command failed (authorize, capture, ...)
    reason: str | None = None
    #: The machine-readable reason (PaymentFailed.reason_code), e.g. "never_seen".
    code: str | None = None
    retryable: bool = False


def transition(payment: Payment, outcome: GatewayOutcome) -> Payment:
    """The payment after `outcome`, or InvalidTransition. `payment` is not modified."""
    p = payment.model_copy(deep=True)
    apply_transition(p, outcome)
    return p


#: Every field `apply_transition` may set: scalars, so undoing a refused outcome is cheap.
_MOVED = ("status", "authorized_minor", "authorized_at", "captured_minor", "captured_at",
          "released_minor", "voided_minor", "refunded_minor", "refund_pending_minor")  # fmt: skip


def apply_transition(p: Payment, outcome: GatewayOutcome) -> None:
    """`transition` in place. On InvalidTransition `p` is left as it was: the fields an
    outcome moves are scalars, saved first and put back, which costs far less than copying
    the whole payment (history, saga, outstanding commands) for every answer."""
    saved = [getattr(p, name) for name in _MOVED]
    try:
        _apply(p, outcome)
    except InvalidTransition:
        for name, value in zip(_MOVED, saved, strict=True):
            setattr(p, name, value)
        raise


def _apply(p: Payment, outcome: GatewayOutcome) -> None:
    kind, amount, status = outcome.kind, outcome.amount_minor, p.status
    if kind != "FAILED" and amount <= 0:
        raise InvalidTransition(f"{kind} with a non-positive amount {amount}")
    if kind == "AUTHORIZED":
        _require(status is S.INITIATED, kind, status)
        if amount > p.amount_minor:
            raise InvalidTransition(
                f"authorized {amount} is more than the {p.amount_minor} requested"
            )
        p.status, p.authorized_minor, p.authorized_at = S.AUTHORIZED, amount, outcome.occurred_at
    elif kind == "FAILED":
        # A declined authorization fails the payment; a failed capture, void, refund or
        # settlement leaves the money where it is and is the saga's to handle.
        if outcome.step in (None, "authorize") and status is S.INITIATED:
            p.status = S.FAILED
        elif status in (S.FAILED, S.CANCELED):
            raise InvalidTransition(f"payment already {status.value.lower()}")
    elif kind == "CAPTURED":
        _require(status is S.AUTHORIZED, kind, status)
        room = p.authorized_minor - p.captured_minor
        if amount > room:
            raise InvalidTransition(f"capture of {amount} exceeds the {room} authorized")
        p.status = S.CAPTURED
        p.captured_minor += amount
        p.captured_at = outcome.occurred_at
        p.released_minor = p.authorized_minor - p.captured_minor  # partial capture: release
    elif kind == "VOIDED":
        _require(status is S.AUTHORIZED, kind, status)
        room = p.authorized_minor - p.captured_minor
        if amount > room:
            raise InvalidTransition(f"void of {amount} exceeds the {room} authorized")
        p.status, p.voided_minor = S.REVERSED, amount
    elif kind == "REFUNDED":
        _require(p.captured_minor > 0 and status in (S.CAPTURED, S.SETTLED, S.REVERSED), kind,
                 status)  # fmt: skip
        room = p.captured_minor - p.refunded_minor
        if amount > room:
            raise InvalidTransition(f"refund of {amount} exceeds the {room} not yet refunded")
        p.refunded_minor += amount
        p.refund_pending_minor = max(0, p.refund_pending_minor - amount)
        if p.refunded_minor == p.captured_minor:
            p.status = S.REVERSED
    elif kind == "SETTLED":
        # A payment refunded in full before its settlement still settles (the acquirer
        # nets the refund); it stays REVERSED.
        _require(p.captured_minor > 0 and status in (S.CAPTURED, S.REVERSED), kind, status)
        if amount > p.captured_minor:
            raise InvalidTransition(
                f"settlement of {amount} exceeds the {p.captured_minor} captured"
            )
        if status is S.CAPTURED:
            p.status = S.SETTLED
    else:
        raise InvalidTransition(f"unknown outcome {kind}")
    problems = invariant_violations(p)
    if problems:  # defence in depth: the rules above should make this unreachable
        raise InvalidTransition("; ".join(problems))


def cancel_if_no_money_moved(p: Payment) -> bool:
    """INITIATED -> CANCELED in place, for a payment whose saga has ended: nothing was
    authorized, so nothing was ever held, captured or refunded. True when it moved; any
    other payment (declined: FAILED, voided or refunded: REVERSED, ...) is left as it is.

    The caller decides that the saga has ended for good; an end whose outcome is unknown
    (IN_DOUBT: a silent gateway may have authorized) must not call this.
    """
    if p.status is not S.INITIATED or p.authorized_minor != 0:
        return False
    p.status = S.CANCELED
    return True


def _require(ok: bool, kind: str, status: PaymentStatus) -> None:
    if not ok:
        raise InvalidTransition(f"{kind} is not allowed in status {status.value}")


def invariant_violations(p: Payment) -> list[str]:
    """Every money rule the payment breaks (empty when it is sound)."""
    problems = []
    if p.amount_minor <= 0:
        problems.append("amount must be positive")
    for name in ("authorized_minor", "captured_minor", "released_minor", "voided_minor",
                 "refunded_minor", "refund_pending_minor"):  # fmt: skip
        value = getattr(p, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            problems.append(f"{name} must be a non-negative integer")
    if p.authorized_minor > p.amount_minor:
        problems.append("authorized exceeds the requested amount")
    if p.captured_minor > p.authorized_minor:
        problems.append("captured exceeds authorized")
    if p.captured_minor + p.released_minor + p.voided_minor > p.authorized_minor:
        problems.append("captured + released + voided exceeds authorized")
    if p.refunded_minor + p.refund_pending_minor > p.captured_minor:
        problems.append("refunded (incl. pending) exceeds captured")
    if p.voided_minor and p.captured_minor:
        problems.append("a captured authorization cannot be voided")
    expected = {
        S.INITIATED: p.authorized_minor == 0,
        S.FAILED: p.authorized_minor == 0,
        S.CANCELED: p.authorized_minor == 0,
        S.AUTHORIZED: p.authorized_minor > 0 and p.captured_minor == 0 and not p.voided_minor,
        S.CAPTURED: p.captured_minor > 0 and p.refunded_minor < p.captured_minor,
        S.SETTLED: p.captured_minor > 0,
        S.REVERSED: p.voided_minor > 0 or (p.captured_minor > 0
                                            and p.refunded_minor == p.captured_minor),
    }  # fmt: skip
    if not expected[p.status]:
        problems.append(f"amounts inconsistent with status {p.status.value}")
    return problems
