"""Pydantic models at the edge: what a decoded event must satisfy before the domain sees it.

The Avro schema only says "a long" and "a string"; these models add what a payment needs:
a positive amount within the per-currency limit, a payable ISO 4217 currency, ISO 3166
country codes, a card token that is not a card number. Money fields are strict ints (no
bool, float or numeric string sneaks in through lax coercion).

Validation errors become DLQ reasons through `validation_reason`, which is built from field
locations and messages only: pydantic's default text (``str(exc)``) echoes the input, and
the input may be a card number. Never log ``str(ValidationError)``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from paysaga.domain.card import contains_pan, looks_like_pan, redact
from paysaga.domain.money import MoneyError, currency_exponent, payable_currencies, validate_amount

__all__ = [
    "STATUSES",
    "CaptureMode",
    "PaymentInitiated",
    "PaymentStatusChanged",
    "to_record",
    "validation_reason",
]

MAX_REASON = 1000
_HEX = "[0-9a-fA-F]"

#: An identifier: non-empty, bounded (it becomes a Kafka key and a RocksDB key).
Id = Annotated[str, Field(min_length=1, max_length=64)]
#: A UUID string as Avro's ``uuid`` logical type carries it. Patterns run in pydantic-core
#: (Rust), several times cheaper than a Python validator on this hot path.
EventId = Annotated[
    str, Field(pattern=f"^{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}$")
]
#: ISO 3166-1 alpha-2 by format (pycountry is not a dependency).
Country = Annotated[str, Field(pattern="^[A-Z]{2}$")]
EpochMillis = Annotated[StrictInt, Field(ge=0)]
Text = Annotated[str, Field(max_length=128)]

#: Every status payment.status can carry (a plain string in Avro, so adding one is not a
#: schema change; readers must tolerate unknown statuses).
Status = Literal[
    "INITIATED",
    "AUTHORIZED",
    "CAPTURED",
    "SETTLED",
    "FAILED",
    "REVERSED",
    "CANCELED",
    "REJECTED",
    "IDEMPOTENCY_CONFLICT",
]
STATUSES: tuple[str, ...] = get_args(Status)


class CaptureMode(StrEnum):
    """Avro enum io.paysaga.CaptureMode."""

    AUTOMATIC = "AUTOMATIC"
    MANUAL = "MANUAL"


def _currency_code(v: str) -> str:
    currency_exponent(v)
    return v


def _amount_in_currency(v: int, info: ValidationInfo) -> int:
    """Positive and within the limit of the model's `currency`, which must be declared
    before the amount so it is validated first; when it failed, its error stands on its own
    field and only the sign is checked here."""
    currency = info.data.get("currency")
    if currency is not None:
        validate_amount(v, currency)
    elif v <= 0:
        raise MoneyError(f"amount_minor {v} must be positive")
    return v


#: An ISO 4217 currency code paysaga can pay in (exponent known).
CurrencyCode = Annotated[
    str, AfterValidator(_currency_code), Field(json_schema_extra={"enum": payable_currencies()})
]
#: Integer minor units of the model's `currency` (declare `currency` first).
AmountMinor = Annotated[
    StrictInt, AfterValidator(_amount_in_currency), Field(json_schema_extra={"minimum": 1})
]


class SagaKind(StrEnum):
    """Avro enum io.paysaga.SagaKind: which saga a payment request runs."""

    PAYMENT = "PAYMENT"
    ORDER = "ORDER"


class OrderItem(BaseModel):
    """One order line (Avro record io.paysaga.OrderItem)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sku: Id
    quantity: Annotated[StrictInt, Field(ge=1, le=10_000)]


class Envelope(BaseModel):
    """The fields every paysaga event starts with (docs/contract.md#the-avro-envelope)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)

    event_id: EventId
    occurred_at: EpochMillis
    payment_id: Id
    correlation_id: Id
    causation_id: Id | None = None


class PaymentInitiated(Envelope):
    """A payment request as upstream sends it (Avro record io.paysaga.PaymentInitiated).

    ``currency`` is declared before ``amount_minor`` (Avro has the opposite order) so the
    amount validator can see the validated currency and report on the ``amount_minor`` field.
    """

    idempotency_key: Annotated[str, Field(min_length=1, max_length=255)]
    merchant_id: Id
    customer_id: Id
    order_id: Id
    currency: CurrencyCode
    amount_minor: AmountMinor
    card_token: Annotated[str, Field(min_length=1, max_length=128)]
    card_bin: str | None = Field(None, pattern=r"^[0-9]{6,8}$")
    card_last4: str | None = Field(None, pattern=r"^[0-9]{4}$")
    country: Country
    capture_mode: CaptureMode = CaptureMode.AUTOMATIC
    ip_address: Annotated[str, Field(max_length=64)] | None = None
    device_id: Text | None = None
    customer_email_hash: Text | None = None
    #: An Avro int: 32 bits.
    customer_age_days: Annotated[StrictInt, Field(ge=0, le=2**31 - 1)] | None = None
    is_first_purchase: StrictBool = False
    shipping_country: Country | None = None
    billing_country: Country | None = None
    description: Annotated[str, Field(max_length=500)] | None = None
    metadata: Annotated[
        dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=500)]],
        Field(max_length=50),
    ] = Field(default_factory=dict)
    saga: SagaKind = SagaKind.PAYMENT
    items: Annotated[list[OrderItem], Field(max_length=100)] = Field(default_factory=list)

    @field_validator("card_token")
    @classmethod
    def _token(cls, v: str) -> str:
        if looks_like_pan(v) or contains_pan(v):
            raise ValueError("looks like a full card number (PAN); send a token")
        return v

    @field_validator("description")
    @classmethod
    def _no_pan_text(cls, v: str | None) -> str | None:
        # Only free-text fields are scanned: long numeric ids (order numbers such as
        # 114-1234567-1234567) would pass Luhn one time in ten and be rejected wrongly.
        if v is not None and contains_pan(v):
            raise ValueError("contains what looks like a card number (PAN)")
        return v

    @field_validator("metadata")
    @classmethod
    def _no_pan_metadata(cls, v: dict[str, str]) -> dict[str, str]:
        if any(contains_pan(k) or contains_pan(x) for k, x in v.items()):
            raise ValueError("contains what looks like a card number (PAN)")
        return v

    @model_validator(mode="after")
    def _order_lines(self) -> PaymentInitiated:
        if self.saga is SagaKind.ORDER and not self.items:
            raise ValueError("an ORDER saga needs at least one item to reserve")
        return self

    def to_avro(self) -> dict[str, Any]:
        """The Avro-ready dict (enums as their symbols, ints stay ints)."""
        return self.model_dump(mode="json")


class PaymentStatusChanged(Envelope):
    """An outcome on payment.status (Avro record io.paysaga.PaymentStatusChanged).

    Built by paysaga, validated anyway: this is what upstream reads, so a negative or
    float amount here would be our bug leaking out.
    """

    merchant_id: Id | None = None
    idempotency_key: Annotated[str, Field(min_length=1, max_length=255)] | None = None
    status: Status
    previous_status: Status | None = None
    currency: CurrencyCode | None = None
    amount_minor: StrictInt | None = None
    authorized_minor: StrictInt = 0
    captured_minor: StrictInt = 0
    refunded_minor: StrictInt = 0
    replay: StrictBool = False
    reason: Annotated[str, Field(max_length=MAX_REASON)] | None = None
    version: Annotated[StrictInt, Field(ge=0)] = 0
    saga: str | None = None
    saga_state: str | None = None
    step: str | None = None
    terminal: StrictBool = False
    retry_variant: str | None = None
    retries: Annotated[StrictInt, Field(ge=0)] = 0

    @field_validator("reason")
    @classmethod
    def _reason(cls, v: str | None) -> str | None:
        return None if v is None else redact(v)

    @model_validator(mode="after")
    def _amounts(self) -> PaymentStatusChanged:
        amounts = {
            "amount_minor": self.amount_minor,
            "authorized_minor": self.authorized_minor,
            "captured_minor": self.captured_minor,
            "refunded_minor": self.refunded_minor,
        }
        for name, value in amounts.items():
            if value is None or (value == 0 and self.currency is None):
                continue
            if self.currency is None:
                raise MoneyError(f"{name} is set but currency is missing")
            try:
                validate_amount(value, self.currency, allow_zero=True)
            except MoneyError as exc:
                raise MoneyError(f"{name}: {exc}") from None
        return self

    def to_avro(self) -> dict[str, Any]:
        """The Avro-ready dict for `AvroCodec.encode("PaymentStatusChanged", ...)`."""
        return self.model_dump()


def validation_reason(exc: ValidationError) -> str:
    """``"field: message; ..."`` without any input value, PAN-redacted, bounded.

    Built from ``loc`` and ``msg`` only (``include_input=False``); a location can still
    carry input (an unexpected metadata key, an extra field name), hence the redaction.
    """
    parts = []
    for err in exc.errors(include_input=False, include_url=False, include_context=False):
        loc = ".".join(str(p) for p in err["loc"]) or "record"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    reason = redact("; ".join(parts))
    return reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 3] + "..."


def to_record(model: BaseModel) -> dict[str, Any]:
    """A model as an Avro-ready dict (enums as their symbols)."""
    return model.model_dump(mode="json")
