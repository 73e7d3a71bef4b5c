"""The payment record kept in the `payments` table, and the status events derived from it.

Pure domain code: no Faust, no Kafka. Ids derived here are deterministic (uuid5 of the
causing event), so reprocessing an input after a crash yields byte-identical outputs that
downstream consumers can deduplicate.
"""

from __future__ import annotations

import hashlib
import uuid
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

#: Namespace of every id paysaga derives; changing it would change every derived id.
PAYSAGA_NS = uuid.UUID("6f1d0c52-8a0e-4d53-9a53-5f0b8d3c7a10")


_NS_BYTES = PAYSAGA_NS.bytes


def derived_id(*parts: str) -> str:
    """A deterministic uuid for an output caused by `parts` (e.g. input event id + role).

    Exactly `str(uuid.uuid5(PAYSAGA_NS, ":".join(parts)))` (RFC 4122 name-based, SHA-1),
    written out without the `UUID` object, which is most of uuid5's cost; the saga derives
    a dozen ids per payment."""
    digest = bytearray(hashlib.sha1(_NS_BYTES + ":".join(parts).encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class PaymentStatus(StrEnum):
    INITIATED = "INITIATED"
    AUTHORIZED = "AUTHORIZED"
    CAPTURED = "CAPTURED"
    SETTLED = "SETTLED"
    FAILED = "FAILED"
    REVERSED = "REVERSED"
    #: The saga ended before any money moved (nothing authorized): Stripe's `canceled`.
    CANCELED = "CANCELED"


class HistoryEntry(BaseModel):
    """One applied event, for `payment history`, the web view and dedup by event_id."""

    model_config = ConfigDict(frozen=True)

    event_id: str
    kind: str
    status: PaymentStatus
    occurred_at: int


class Outstanding(BaseModel):
    """A command sent and not yet answered. Retries keep the idempotency key."""

    model_config = ConfigDict(extra="forbid")

    idempotency_key: str
    service: str  # payment | inventory | shipping
    action: str  # AUTHORIZE, CAPTURE, VOID, REFUND, SETTLE, RESERVE, RELEASE, ...
    step: str  # the saga step, or "refund" for a refund request
    role: str  # action | compensation | request
    attempt: int = 1
    amount_minor: int = 0
    #: Wall-clock epoch ms of the next step: SENT / INQUIRING, the answer is overdue;
    #: WAITING, the retry is due. HELD has none (the circuit breaker releases it).
    deadline: int = 0
    #: SENT (waiting for the answer) | WAITING (a retry is scheduled) | INQUIRING (asking
    #: the gateway what became of the key) | HELD (the circuit breaker is open).
    phase: str = "SENT"
    #: Retries scheduled so far (command retries and repeated inquiries alike): the retry
    #: level of the next one (domain/retry.py).
    retries: int = 0
    #: Inquiries sent about this key (their command ids are `inquiry_id(key, n)`).
    inquiries: int = 0
    #: WAITING: at the due time, send an inquiry rather than the command again.
    next_inquiry: bool = False
    #: The class and reason of the last failure (the retry records and the DLQ say them).
    error_class: str | None = None
    reason: str | None = None
    #: The `paysaga.redrive.*` headers of the operator's resume that took this command up
    #: again (docs/dlq.md#resuming-a-review): a review letter written if it runs out of
    #: retries once more carries them, so redrive's cap sees every round.
    redrive: dict[str, str] = Field(default_factory=dict)


class RefundRequest(BaseModel):
    """A refund requested by upstream, idempotent by its own key."""

    model_config = ConfigDict(extra="forbid")

    fingerprint: str
    amount_minor: int
    state: str = "PENDING"  # PENDING | DONE | FAILED | IN_DOUBT
    reason: str | None = None


class SagaState(BaseModel):
    """Where the payment's saga is. Lives in the payment record (the payments table)."""

    model_config = ConfigDict(extra="forbid")

    kind: str  # PAYMENT | ORDER
    state: str = "RUNNING"  # RUNNING COMPENSATING COMPLETED COMPENSATED FAILED IN_DOUBT
    step: int = 0  # index of the current step (RUNNING)
    completed: list[int] = Field(default_factory=list)
    #: Steps still to compensate, in order (COMPENSATING); the head is being compensated.
    to_compensate: list[int] = Field(default_factory=list)
    awaiting_request: bool = False  # manual capture: waiting for upstream's capture request
    reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_SAGA_STATES


TERMINAL_SAGA_STATES = frozenset({"COMPLETED", "COMPENSATED", "FAILED", "IN_DOUBT"})


class OrderLine(BaseModel):
    model_config = ConfigDict(frozen=True)

    sku: str
    quantity: int


class Payment(BaseModel):
    """A payment as the `payments` table holds it. Money in integer minor units only."""

    model_config = ConfigDict(extra="forbid")

    payment_id: str
    merchant_id: str
    customer_id: str
    order_id: str
    idempotency_key: str
    amount_minor: int
    currency: str
    capture_mode: str
    card_token: str
    card_last4: str | None = None
    shipping_country: str | None = None
    items: list[OrderLine] = Field(default_factory=list)
    status: PaymentStatus = PaymentStatus.INITIATED
    authorized_minor: int = 0
    captured_minor: int = 0
    #: Authorized but released when a partial capture closed the authorization.
    released_minor: int = 0
    voided_minor: int = 0
    refunded_minor: int = 0
    #: Refunds sent to the gateway and not answered yet (counted against the captured amount).
    refund_pending_minor: int = 0
    #: Amount of the capture to send (manual capture: from the request; else authorized).
    capture_minor: int | None = None
    authorized_at: int | None = None
    #: Event time of the (first) capture: where the settlement lag is measured from.
    captured_at: int | None = None
    #: Event time after which an uncaptured authorization is voided (manual capture).
    auth_expires_at: int | None = None
    saga: SagaState | None = None
    outstanding: dict[str, Outstanding] = Field(default_factory=dict)
    refunds: dict[str, RefundRequest] = Field(default_factory=dict)
    #: Commands whose retries ran out with their outcome unknown or not yet done (a saga
    #: IN_DOUBT, a refund IN_DOUBT, a settlement given up): kept by idempotency key, so a
    #: late answer or an operator's resume takes them up again with the same key
    #: (docs/retries.md#in-doubt-is-not-the-end).
    doubts: dict[str, Outstanding] = Field(default_factory=dict)
    #: Capture and cancel request keys -> fingerprint (idempotent requests).
    requests: dict[str, str] = Field(default_factory=dict)
    #: Due times currently in the table's timer indexes (so they can be moved or cleared).
    timer_wall: int | None = None
    timer_event: int | None = None
    #: Wall clock at which the circuit breaker first held one of its commands, while it
    #: holds any (the payment is then in the breaker table's held index).
    held_at: int | None = None
    #: The A/B retry strategy of the customer (domain/retry.py), fixed at the start.
    retry_variant: str | None = None
    #: Commands sent again so far (the experiments' average retry count).
    retries: int = 0
    #: What the experiments table counted when the saga ended ([retries, outcome ms]), so
    #: an IN_DOUBT saga taken up again takes its count back and is counted once, at its end.
    counted: list[int] | None = None
    version: int = 0
    created_at: int
    updated_at: int
    history: list[HistoryEntry] = Field(default_factory=list)

    def to_table(self) -> dict[str, Any]:
        """The JSON-safe dict of the table value (ints stay ints; no floats anywhere)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_table(cls, value: dict[str, Any]) -> Payment:
        return cls.model_validate(value)

    def to_json(self) -> bytes:
        """The table value: compact JSON written by pydantic-core in one pass, about three
        times cheaper than `to_table` plus `json` (the saga writes it on every input)."""
        return self.model_dump_json().encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Payment:
        """A stored payment, parsed and validated by pydantic-core in one pass."""
        return cls.model_validate_json(raw)

    def seen(self, event_id: str) -> bool:
        """Has this input event already been applied (dedup by event_id)?"""
        return any(h.event_id == event_id for h in self.history)

    def record(self, event_id: str, kind: str, occurred_at: int) -> None:
        """Note an applied input: history, version, last update (event time)."""
        self.history.append(
            HistoryEntry(event_id=event_id, kind=kind, status=self.status, occurred_at=occurred_at)
        )
        self.version += 1
        self.updated_at = max(self.updated_at, occurred_at)


def initiate(event: Any) -> Payment:
    """A new payment from a validated PaymentInitiated (duck-typed: the edge model)."""
    payment = Payment(
        payment_id=event.payment_id,
        merchant_id=event.merchant_id,
        customer_id=event.customer_id,
        order_id=event.order_id,
        idempotency_key=event.idempotency_key,
        amount_minor=event.amount_minor,
        currency=event.currency,
        capture_mode=str(getattr(event.capture_mode, "value", event.capture_mode)),
        card_token=event.card_token,
        card_last4=event.card_last4,
        shipping_country=getattr(event, "shipping_country", None),
        items=[OrderLine(sku=i.sku, quantity=i.quantity) for i in getattr(event, "items", ())],
        created_at=event.occurred_at,
        updated_at=event.occurred_at,
    )
    payment.record(event.event_id, "PaymentInitiated", event.occurred_at)
    return payment


def status_event(
    payment: Payment,
    *,
    cause_event_id: str,
    occurred_at: int,
    previous: str | None,
    replay: bool = False,
    reason: str | None = None,
    status: str | None = None,
    role: str | None = None,
    terminal: bool = False,
    step: str | None = None,
) -> dict[str, Any]:
    """The PaymentStatusChanged record (as an Avro-ready dict) for a state change or replay.

    `role` distinguishes several status records caused by the same input (their ids must
    differ and stay deterministic).
    """
    saga = payment.saga
    tag = role or ("replay" if replay else "change")
    return {
        "event_id": derived_id(cause_event_id, "status", payment.payment_id, tag),
        "occurred_at": occurred_at,
        "payment_id": payment.payment_id,
        "correlation_id": payment.order_id,
        "causation_id": cause_event_id,
        "merchant_id": payment.merchant_id,
        "idempotency_key": payment.idempotency_key,
        "status": status or payment.status.value,
        "previous_status": previous,
        "amount_minor": payment.amount_minor,
        "currency": payment.currency,
        "authorized_minor": payment.authorized_minor,
        "captured_minor": payment.captured_minor,
        "refunded_minor": payment.refunded_minor,
        "replay": replay,
        "reason": reason,
        "version": payment.version,
        "saga": None if saga is None else saga.kind,
        "saga_state": None if saga is None else saga.state,
        "step": step,
        "terminal": terminal,
        "retry_variant": payment.retry_variant,
        "retries": payment.retries,
    }
