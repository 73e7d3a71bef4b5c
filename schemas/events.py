"""Edge models of the events and requests the saga consumes (gateway, services, upstream).

Each mirrors its Avro record and adds what the domain relies on: positive integer amounts
within the currency's limit, ISO 4217 currencies, bounded identifiers. A record that fails
here goes to the DLQ with the reason; the saga never sees it.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import Field, StrictBool, StrictInt, ValidationInfo, field_validator

from paysaga.domain.money import currency_exponent, validate_amount
from paysaga.schemas.models import Envelope, Id

Text = Annotated[str, Field(max_length=500)]
Key = Annotated[str, Field(min_length=1, max_length=255)]


class _Money(Envelope):
    """An event carrying `currency` then `amount_minor` (currency validated first)."""

    currency: str
    amount_minor: StrictInt

    @field_validator("currency")
    @classmethod
    def _currency(cls, v: str) -> str:
        currency_exponent(v)
        return v

    @field_validator("amount_minor")
    @classmethod
    def _amount(cls, v: int, info: ValidationInfo) -> int:
        currency = info.data.get("currency")
        if currency is not None:
            validate_amount(v, currency)
        return v


class PaymentAuthorized(_Money):
    authorization_code: Id
    gateway_reference: Id
    command_id: Id | None = None


class PaymentCaptured(_Money):
    merchant_id: Id
    gateway_reference: Id
    capture_id: Id
    command_id: Id | None = None


class PaymentFailed(Envelope):
    reason_code: Id
    reason: Text
    step: Id
    retryable: StrictBool = False
    command_id: Id | None = None


class ReversalKind(StrEnum):
    VOID = "VOID"
    REFUND = "REFUND"


class PaymentReversed(_Money):
    kind: ReversalKind
    reversal_id: Id
    command_id: Id | None = None


class PaymentSettled(_Money):
    merchant_id: Id
    settlement_id: Id
    settlement_date: Annotated[str, Field(pattern=r"^\d{4}-\d{2}-\d{2}$")]
    command_id: Id | None = None


class InventoryOutcome(StrEnum):
    RESERVED = "RESERVED"
    RESERVATION_FAILED = "RESERVATION_FAILED"
    RELEASED = "RELEASED"


class InventoryEvent(Envelope):
    outcome: InventoryOutcome
    command_id: Id
    reason: Text | None = None


class ShippingOutcome(StrEnum):
    CREATED = "CREATED"
    CREATION_FAILED = "CREATION_FAILED"
    CANCELLED = "CANCELLED"


class ShippingEvent(Envelope):
    outcome: ShippingOutcome
    command_id: Id
    reason: Text | None = None


class RequestType(StrEnum):
    CAPTURE = "CAPTURE"
    REFUND = "REFUND"
    CANCEL = "CANCEL"


class PaymentRequest(Envelope):
    """Upstream's capture / refund / cancel request on an existing payment."""

    request_type: RequestType
    idempotency_key: Key
    merchant_id: Id
    currency: str | None = None
    amount_minor: StrictInt | None = None
    reason: Text | None = None

    @field_validator("currency")
    @classmethod
    def _currency(cls, v: str | None) -> str | None:
        if v is not None:
            currency_exponent(v)
        return v

    @field_validator("amount_minor")
    @classmethod
    def _amount(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is None:
            return v
        currency = info.data.get("currency")
        if currency is None:
            raise ValueError("an amount needs its currency")
        validate_amount(v, currency)
        return v
