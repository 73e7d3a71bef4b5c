"""The HTTP payments API's edge models: what a body may hold and what an answer says.

The body of `POST /v1/payments` is PaymentInitiated without its envelope and its key (the
`Idempotency-Key` header): the model is derived from the Avro edge model field by field, so
the API accepts exactly what upstream producers may send, and the event built from it is
validated again by PaymentInitiated itself (currency, amount within the currency, no PAN in
the token or free text). OpenAPI (streams/ops/openapi.py) is generated from these models.
Money is integer minor units with an ISO 4217 currency (docs/api.md).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, create_model

from paysaga.domain.payment import Payment
from paysaga.schemas.models import Envelope, PaymentInitiated
from paysaga.streams.ops.inspection import utc

_ENVELOPE = set(Envelope.model_fields)
_HEADER_FIELDS = {"idempotency_key"}


def _body_fields() -> dict[str, Any]:
    return {
        name: (f.annotation, f)
        for name, f in PaymentInitiated.model_fields.items()
        if name not in _ENVELOPE | _HEADER_FIELDS
    }


#: `POST /v1/payments`: a payment request, the card as a token (never a card number).
CreatePayment: type[BaseModel] = create_model(
    "CreatePayment",
    __config__=ConfigDict(extra="forbid", frozen=True),
    __doc__="A payment request: PaymentInitiated's business fields (docs/api.md).",
    **_body_fields(),
)

PositiveMinor = Annotated[StrictInt, Field(gt=0, description="integer minor units")]
Reason = Annotated[str, Field(max_length=500)]


class CaptureBody(BaseModel):
    """`POST /v1/payments/{id}/capture`: all that is authorized, or `amount_minor` of it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    amount_minor: PositiveMinor | None = None
    reason: Reason | None = None


class RefundBody(BaseModel):
    """`POST /v1/payments/{id}/refund`: all that is refundable, or a part (`amount_minor`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    amount_minor: PositiveMinor | None = None
    reason: Reason | None = None


class CancelBody(BaseModel):
    """`POST /v1/payments/{id}/cancel`: void an authorization that awaits its capture."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reason: Reason | None = None


class FieldError(BaseModel):
    field: str
    message: str


class ApiError(BaseModel):
    """Every error answer: a stable `code`, a message, and the field errors of a 400. No
    input value is ever echoed (a card number in a body must not come back in a log)."""

    error: str
    code: str
    fields: list[FieldError] = Field(default_factory=list)
    payment_id: str | None = None


class SagaView(BaseModel):
    kind: str
    state: str
    step: int
    awaiting_capture: bool
    reason: str | None


class RefundView(BaseModel):
    idempotency_key: str
    amount_minor: int
    state: str


def utc_iso(ms: int | None) -> str | None:
    """Epoch millis as ISO 8601 UTC with millis (`2026-12-03T10:15:30.123Z`)."""
    return None if ms is None else utc(ms)


class PaymentResource(BaseModel):
    """A payment as the API shows it, from committed state (Stripe's PaymentIntent, in
    paysaga's words): amounts in minor units, the saga's progress, no card data beyond
    the last four digits."""

    id: str
    object: Literal["payment"] = "payment"
    status: str
    merchant_id: str
    order_id: str
    currency: str
    amount_minor: int
    capture_mode: str
    authorized_minor: int
    captured_minor: int
    refunded_minor: int
    refund_pending_minor: int
    voided_minor: int
    card_last4: str | None
    saga: SagaView | None
    refunds: list[RefundView]
    retry_variant: str | None
    version: int
    created_at: str | None
    updated_at: str | None

    @classmethod
    def of(cls, p: Payment) -> PaymentResource:
        saga = None
        if p.saga is not None:
            saga = SagaView(
                kind=p.saga.kind,
                state=p.saga.state,
                step=p.saga.step,
                awaiting_capture=p.saga.awaiting_request,
                reason=p.saga.reason,
            )
        refunds = [
            RefundView(idempotency_key=k, amount_minor=r.amount_minor, state=r.state)
            for k, r in sorted(p.refunds.items())
        ]
        return cls(
            id=p.payment_id,
            status=p.status.value,
            merchant_id=p.merchant_id,
            order_id=p.order_id,
            currency=p.currency,
            amount_minor=p.amount_minor,
            capture_mode=p.capture_mode,
            authorized_minor=p.authorized_minor,
            captured_minor=p.captured_minor,
            refunded_minor=p.refunded_minor,
            refund_pending_minor=p.refund_pending_minor,
            voided_minor=p.voided_minor,
            card_last4=p.card_last4,
            saga=saga,
            refunds=refunds,
            retry_variant=p.retry_variant,
            version=p.version,
            created_at=utc_iso(p.created_at),
            updated_at=utc_iso(p.updated_at),
        )


class WriteAnswer(BaseModel):
    """A write's answer: 202 when it is recorded and the saga has not answered yet (or
    `?wait` ran out), 200 with the payment once it has. `replayed` is true when the
    idempotency key was seen before with the same body: nothing new was written."""

    id: str
    object: Literal["payment_write"] = "payment_write"
    operation: Literal["create", "capture", "refund", "cancel"]
    idempotency_key: str
    replayed: bool
    answered: bool
    payment: PaymentResource | None = None
