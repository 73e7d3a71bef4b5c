"""Unit tests for the edge model PaymentInitiated and the PAN-safe `validation_reason`."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from paysaga.domain.payment import PaymentStatus
from paysaga.schemas.codec import AvroCodec
from paysaga.schemas.models import (
    STATUSES,
    CaptureMode,
    PaymentInitiated,
    PaymentStatusChanged,
    to_record,
    validation_reason,
)
from paysaga.schemas.registry import SchemaRegistry
from tests.samples import initiated

PAN = "4111111111111111"
PAN_PREFIX = "411111111111"  # 12 digits: even a partial echo must not appear


def valid(**overrides: Any) -> dict[str, Any]:
    return {**initiated(1)[0], **overrides}


def rejected(record: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        PaymentInitiated.model_validate(record)
    return validation_reason(info.value)


def test_samples_validate() -> None:
    samples = initiated(5)
    assert len({s["payment_id"] for s in samples}) == 5
    for record in samples:
        model = PaymentInitiated.model_validate(record)
        assert model.amount_minor == record["amount_minor"]
        assert to_record(model) == record


def test_defaults_for_optional_fields() -> None:
    record = valid()
    for key in (
        "causation_id",
        "card_bin",
        "card_last4",
        "ip_address",
        "device_id",
        "customer_email_hash",
        "customer_age_days",
        "is_first_purchase",
        "shipping_country",
        "billing_country",
        "description",
        "metadata",
        "capture_mode",
    ):
        del record[key]
    model = PaymentInitiated.model_validate(record)
    assert model.metadata == {}
    assert model.description is None
    assert model.capture_mode is CaptureMode.AUTOMATIC
    assert model.is_first_purchase is False


def test_model_is_frozen() -> None:
    model = PaymentInitiated.model_validate(valid())
    with pytest.raises(ValidationError):
        model.amount_minor = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("amount", "currency"),
    [(1, "USD"), (1_000_000_000, "USD"), (10_000_000, "JPY"), (10_000_000_000, "BHD")],
)
def test_amounts_at_the_edges_validate(amount: int, currency: str) -> None:
    PaymentInitiated.model_validate(valid(amount_minor=amount, currency=currency))


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"amount_minor": -1}, "amount_minor", "negative"),
        ({"amount_minor": 0}, "amount_minor", "not allowed"),
        ({"amount_minor": 1_000_000_001, "currency": "USD"}, "amount_minor", "exceeds"),
        ({"amount_minor": 10_000_001, "currency": "JPY"}, "amount_minor", "exceeds"),
        ({"amount_minor": 10.5}, "amount_minor", "integer"),
        ({"amount_minor": 100.0}, "amount_minor", "integer"),
        ({"amount_minor": "100"}, "amount_minor", "integer"),
        ({"amount_minor": True}, "amount_minor", "integer"),
        ({"currency": "ZZZ"}, "currency", "unknown currency"),
        ({"currency": "XAU"}, "currency", "not payable"),
        ({"currency": "usd"}, "currency", ""),
        ({"country": "usa"}, "country", ""),
        ({"country": "us"}, "country", ""),
        ({"shipping_country": "USA"}, "shipping_country", ""),
        ({"card_last4": "12a4"}, "card_last4", ""),
        ({"card_bin": "12"}, "card_bin", ""),
        ({"surprise": "x"}, "surprise", "Extra inputs"),
        ({"capture_mode": "LATER"}, "capture_mode", ""),
        ({"occurred_at": -1}, "occurred_at", ""),
        ({"is_first_purchase": "yes"}, "is_first_purchase", ""),
        ({"payment_id": ""}, "payment_id", ""),
    ],
)
def test_invalid_records(overrides: dict[str, Any], field: str, words: str) -> None:
    reason = rejected(valid(**overrides))
    assert field in reason
    assert words in reason


def test_missing_required_field() -> None:
    record = valid()
    del record["currency"]
    assert "currency" in rejected(record)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"card_token": PAN}, "card_token"),
        ({"card_token": "4111 1111 1111 1111"}, "card_token"),
        ({"card_token": f"tok_{PAN}"}, "card_token"),
        ({"description": f"paid with {PAN}, thanks"}, "description"),
        ({"description": "card 4111-1111-1111-1111"}, "description"),
        ({"metadata": {"note": PAN}}, "metadata"),
        ({"metadata": {"channel": "web", "note": f"card {PAN} 12"}}, "metadata"),
        ({"metadata": {PAN: "x"}}, "metadata"),
    ],
)
def test_pan_is_rejected_and_not_echoed(overrides: dict[str, Any], field: str) -> None:
    reason = rejected(valid(**overrides))
    assert field in reason
    assert "PAN" in reason or "card number" in reason
    assert PAN not in reason
    assert PAN_PREFIX not in reason


@pytest.mark.parametrize(
    "overrides",
    [
        {PAN: "x"},  # an unknown field named like a PAN
        {"metadata": {PAN: 5}},  # a PAN metadata key whose value is the wrong type
    ],
)
def test_pan_in_error_location_is_redacted(overrides: dict[str, Any]) -> None:
    reason = rejected(valid(**overrides))
    assert PAN not in reason
    assert PAN_PREFIX not in reason
    assert "[REDACTED-PAN]" in reason


def test_reason_does_not_echo_input() -> None:
    reason = rejected(valid(country="secret-value", amount_minor="also-secret"))
    assert "secret" not in reason
    assert "country" in reason and "amount_minor" in reason


def test_card_bin_and_last4_are_allowed() -> None:
    model = PaymentInitiated.model_validate(valid(card_bin="41111111", card_last4="1111"))
    assert model.card_bin == "41111111"


def test_order_number_in_description_is_allowed() -> None:
    model = PaymentInitiated.model_validate(valid(description="order 123456, 2 items"))
    assert model.description == "order 123456, 2 items"


# -- PaymentStatusChanged: the outcome we publish ------------------------------------------


def status(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "event_id": "5f0b8d3c-0000-4000-8000-000000000001",
        "occurred_at": 1_700_000_000_000,
        "payment_id": "pay_1",
        "correlation_id": "ord_1",
        "causation_id": "5f0b8d3c-0000-4000-8000-000000000000",
        "merchant_id": "m_001",
        "idempotency_key": "idem_1",
        "status": "CAPTURED",
        "previous_status": "AUTHORIZED",
        "amount_minor": 1250,
        "currency": "USD",
        "authorized_minor": 1250,
        "captured_minor": 1250,
        "refunded_minor": 0,
        "replay": False,
        "reason": None,
        "version": 3,
        "saga": "PAYMENT",
        "saga_state": "COMPLETED",
        "step": "capture",
        "terminal": True,
        "retry_variant": "TEST_A",
        "retries": 2,
    }
    return {**base, **overrides}


def test_status_round_trips_through_avro() -> None:
    codec = AvroCodec(SchemaRegistry())
    model = PaymentStatusChanged.model_validate(status())
    record = model.to_avro()
    assert record == status()
    assert codec.decode(codec.encode("PaymentStatusChanged", record), "PaymentStatusChanged") == (
        record
    )


def test_status_minimal_conflict_outcome() -> None:
    model = PaymentStatusChanged.model_validate(
        status(
            status="IDEMPOTENCY_CONFLICT",
            previous_status=None,
            amount_minor=None,
            currency=None,
            authorized_minor=0,
            captured_minor=0,
        )
    )
    assert model.amount_minor is None and model.captured_minor == 0
    assert set(STATUSES) >= {"REJECTED", "IDEMPOTENCY_CONFLICT"}


def test_every_payment_status_can_be_published() -> None:
    """The record's statuses are the domain's plus the intake/refusal outcomes."""
    assert set(STATUSES) == {s.value for s in PaymentStatus} | {"REJECTED", "IDEMPOTENCY_CONFLICT"}


def test_canceled_status_round_trips_through_avro() -> None:
    """A saga that ended before any money moved: CANCELED, nothing authorized, terminal."""
    codec = AvroCodec(SchemaRegistry())
    canceled = status(status="CANCELED", previous_status="INITIATED", authorized_minor=0,
                      captured_minor=0, saga="ORDER", saga_state="FAILED",
                      step="reserve_inventory")  # fmt: skip
    record = PaymentStatusChanged.model_validate(canceled).to_avro()
    assert (record["status"], record["terminal"]) == ("CANCELED", True)
    decoded = codec.decode(codec.encode("PaymentStatusChanged", record), "PaymentStatusChanged")
    assert decoded == record


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"status": "LOST"}, "status"),
        ({"captured_minor": -1}, "negative"),
        ({"refunded_minor": 1.5}, "integer"),
        ({"amount_minor": True}, "integer"),
        ({"currency": "ZZZ"}, "unknown currency"),
        ({"currency": None}, "currency is missing"),
        ({"authorized_minor": 10**12}, "exceeds"),
        ({"extra": 1}, "Extra inputs"),
    ],
)
def test_status_rejects_bad_outputs(overrides: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError) as info:
        PaymentStatusChanged.model_validate(status(**overrides))
    assert words in validation_reason(info.value)


def test_status_reason_is_redacted() -> None:
    model = PaymentStatusChanged.model_validate(status(reason=f"gateway said {PAN}"))
    assert model.reason is not None and PAN not in model.reason
