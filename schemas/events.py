"""Edge models of the events and requests the saga consumes (gateway, services, upstream).

Each mirrors its Avro record and adds what the domain relies on: positive integer amounts
within the currency's limit, ISO 4217 currencies, bounded identifiers. A record that fails
here goes to the DLQ with the reason; the saga never sees it.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationInfo,
    field_validator,
)

from paysaga.domain.money import validate_amount
from paysaga.schemas.models import AmountMinor, CurrencyCode, Envelope, EpochMillis, EventId, Id

Text = Annotated[str, Field(max_length=500)]
Key = Annotated[str, Field(min_length=1, max_length=255)]
IsoDate = Annotated[str, Field(pattern=r"^\d{4}-\d{2}-\d{2}$")]


class _Answer(Envelope):
    """A service's answer; `command_id` names the command it answers (null: unsolicited)."""

    command_id: Id | None = None


class _Money(_Answer):
    """An answer carrying money: `currency` first, so the amount is checked against it."""

    currency: CurrencyCode
    amount_minor: AmountMinor


class PaymentAuthorized(_Money):
    authorization_code: Id
    gateway_reference: Id


class PaymentCaptured(_Money):
    merchant_id: Id
    gateway_reference: Id
    capture_id: Id


class PaymentFailed(_Answer):
    reason_code: Id
    reason: Text
    step: Id
    retryable: StrictBool = False


class ReversalKind(StrEnum):
    VOID = "VOID"
    REFUND = "REFUND"


class PaymentReversed(_Money):
    kind: ReversalKind
    reversal_id: Id
    #: Null from writers before reconciliation needed it (docs/reconciliation.md).
    merchant_id: Id | None = None


class PaymentSettled(_Money):
    merchant_id: Id
    settlement_id: Id
    settlement_date: IsoDate


class BankDirection(StrEnum):
    CREDIT = "CREDIT"
    DEBIT = "DEBIT"


class BankStatementLine(BaseModel):
    """One bank statement line (`bank.statements`, keyed by merchant_id). Not a paysaga
    event, so no envelope beyond its id and time; a line without a merchant, in an unknown
    currency or with an amount that is not positive is refused (the DLQ), and the direction
    gives the sign (docs/reconciliation.md#what-is-matched)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_id: EventId
    occurred_at: EpochMillis
    statement_id: Id
    line_id: Id
    merchant_id: Id
    payment_reference: Id | None = None
    currency: CurrencyCode
    amount_minor: AmountMinor
    value_date: IsoDate
    booking_date: IsoDate
    direction: BankDirection = BankDirection.CREDIT

    @property
    def line_key(self) -> str:
        return f"{self.statement_id}/{self.line_id}"

    @property
    def signed_minor(self) -> int:
        return -self.amount_minor if self.direction is BankDirection.DEBIT else self.amount_minor


class InventoryOutcome(StrEnum):
    RESERVED = "RESERVED"
    RESERVATION_FAILED = "RESERVATION_FAILED"
    RELEASED = "RELEASED"


class _ServiceAnswer(_Answer):
    command_id: Id  # inventory and shipping always answer a command
    reason: Text | None = None


class InventoryEvent(_ServiceAnswer):
    outcome: InventoryOutcome


class ShippingOutcome(StrEnum):
    CREATED = "CREATED"
    CREATION_FAILED = "CREATION_FAILED"
    CANCELLED = "CANCELLED"


class ShippingEvent(_ServiceAnswer):
    outcome: ShippingOutcome


class RequestType(StrEnum):
    CAPTURE = "CAPTURE"
    REFUND = "REFUND"
    CANCEL = "CANCEL"


class PaymentRequest(Envelope):
    """Upstream's capture / refund / cancel request on an existing payment."""

    request_type: RequestType
    idempotency_key: Key
    merchant_id: Id
    currency: CurrencyCode | None = None
    amount_minor: StrictInt | None = None
    reason: Text | None = None

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


class SagaResume(Envelope):
    """An operator's resume of a saga command given up (paysaga.saga.resume): what
    `paysaga dlq redrive` sends for a review letter (docs/dlq.md#resuming-a-review)."""

    #: A command's key: `<payment_id>:<step>:<role>`, or a refund's `<payment_id>:refund:`
    #: plus upstream's own key (up to 255): longer than an upstream `Key`.
    idempotency_key: Annotated[str, Field(min_length=1, max_length=400)]
    service: Id
    action: Id
    step: Id
    attempt: StrictInt
    inquiries: StrictInt
    error_class: Id
    reason: Annotated[str, Field(max_length=1000)]
