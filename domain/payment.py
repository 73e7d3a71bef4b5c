"""The payment record kept in the `payments` table, and the status events derived from it.

Pure domain code: no Faust, no Kafka. Ids derived here are deterministic (uuid5 of the
causing event), so reprocessing an input after a crash yields byte-identical outputs that
downstream consumers can deduplicate.
"""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

#: Namespace of every id paysaga derives; changing it would change every derived id.
PAYSAGA_NS = uuid.UUID("6f1d0c52-8a0e-4d53-9a53-5f0b8d3c7a10")


def derived_id(*parts: str) -> str:
    """A deterministic uuid for an output caused by `parts` (e.g. input event id + role)."""
    return str(uuid.uuid5(PAYSAGA_NS, ":".join(parts)))


class PaymentStatus(StrEnum):
    INITIATED = "INITIATED"
    AUTHORIZED = "AUTHORIZED"
    CAPTURED = "CAPTURED"
    SETTLED = "SETTLED"
    FAILED = "FAILED"
    REVERSED = "REVERSED"


class HistoryEntry(BaseModel):
    """One applied event, for `payment history` and the web view."""

    model_config = ConfigDict(frozen=True)

    event_id: str
    kind: str
    status: PaymentStatus
    occurred_at: int


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
    status: PaymentStatus = PaymentStatus.INITIATED
    authorized_minor: int = 0
    captured_minor: int = 0
    refunded_minor: int = 0
    version: int = 0
    created_at: int
    updated_at: int
    history: list[HistoryEntry] = Field(default_factory=list)

    def to_table(self) -> dict[str, Any]:
        """The JSON-safe dict stored in the table (ints stay ints; no floats anywhere)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_table(cls, value: dict[str, Any]) -> Payment:
        return cls.model_validate(value)


def initiate(event: Any) -> Payment:
    """A new payment from a validated PaymentInitiated (duck-typed: the edge model)."""
    return Payment(
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
        created_at=event.occurred_at,
        updated_at=event.occurred_at,
        version=1,
        history=[
            HistoryEntry(
                event_id=event.event_id,
                kind="PaymentInitiated",
                status=PaymentStatus.INITIATED,
                occurred_at=event.occurred_at,
            )
        ],
    )


def status_event(
    payment: Payment,
    *,
    cause_event_id: str,
    occurred_at: int,
    previous: str | None,
    replay: bool = False,
    reason: str | None = None,
    status: str | None = None,
) -> dict[str, Any]:
    """The PaymentStatusChanged record (as an Avro-ready dict) for a state change or replay."""
    return {
        "event_id": derived_id(cause_event_id, "status", "replay" if replay else "change"),
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
    }
