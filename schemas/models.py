"""Pydantic models at the edge: what a decoded event must satisfy before the domain sees it.

Validation errors become DLQ reasons through `validation_reason`, which is built from field
locations and messages only: pydantic's default text echoes the input, and the input may be
a card number.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from paysaga.domain.card import contains_pan, looks_like_pan, redact
from paysaga.domain.money import MAX_MAJOR_UNITS, currency_exponent, validate_amount

_COUNTRY = re.compile(r"[A-Z]{2}")
Id = Annotated[str, Field(min_length=1, max_length=64)]


class CaptureMode(StrEnum):
    AUTOMATIC = "AUTOMATIC"
    MANUAL = "MANUAL"


class PaymentInitiated(BaseModel):
    """A payment request as upstream sends it (Avro record io.paysaga.PaymentInitiated)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_id: Id
    occurred_at: StrictInt = Field(ge=0)
    payment_id: Id
    correlation_id: Id
    causation_id: str | None = None
    idempotency_key: Annotated[str, Field(min_length=1, max_length=255)]
    merchant_id: Id
    customer_id: Id
    order_id: Id
    amount_minor: StrictInt
    currency: str
    card_token: Annotated[str, Field(min_length=1, max_length=128)]
    card_bin: str | None = Field(None, pattern=r"^\d{6,8}$")
    card_last4: str | None = Field(None, pattern=r"^\d{4}$")
    country: str
    capture_mode: CaptureMode = CaptureMode.AUTOMATIC
    ip_address: str | None = Field(None, max_length=64)
    device_id: str | None = Field(None, max_length=128)
    customer_email_hash: str | None = Field(None, max_length=128)
    customer_age_days: StrictInt | None = Field(None, ge=0)
    is_first_purchase: StrictBool = False
    shipping_country: str | None = None
    billing_country: str | None = None
    description: str | None = Field(None, max_length=500)
    metadata: dict[str, str] = Field(default_factory=dict, max_length=50)

    @field_validator("currency")
    @classmethod
    def _currency(cls, v: str) -> str:
        currency_exponent(v)
        return v

    @field_validator("country", "shipping_country", "billing_country")
    @classmethod
    def _country(cls, v: str | None) -> str | None:
        if v is not None and not _COUNTRY.fullmatch(v):
            raise ValueError("must be an ISO 3166-1 alpha-2 code (2 uppercase letters)")
        return v

    @field_validator("card_token")
    @classmethod
    def _token(cls, v: str) -> str:
        if looks_like_pan(v) or contains_pan(v):
            raise ValueError("looks like a full card number (PAN); send a token")
        return v

    @field_validator("description", "idempotency_key", "customer_id", "order_id")
    @classmethod
    def _no_pan_text(cls, v: str | None) -> str | None:
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
    def _amount(self) -> PaymentInitiated:
        validate_amount(self.amount_minor, self.currency, max_major_units=MAX_MAJOR_UNITS)
        return self


def validation_reason(exc: ValidationError) -> str:
    """'field: message; ...' without any input value, PAN-redacted."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False, include_context=False):
        loc = ".".join(str(p) for p in err["loc"]) or "record"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return redact("; ".join(parts))


def to_record(model: BaseModel) -> dict[str, Any]:
    """A model as an Avro-ready dict (enums as their symbols)."""
    return model.model_dump(mode="json")
