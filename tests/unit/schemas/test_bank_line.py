"""The bank statement line's edge model: what reconciliation refuses (to the DLQ)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from paysaga.schemas import events as ev
from paysaga.schemas.codec import AvroCodec
from paysaga.schemas.registry import SchemaRegistry


def line(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "event_id": "6f1d0c52-8a0e-4d53-9a53-5f0b8d3c7a10", "occurred_at": 1_780_000_000_000,
        "statement_id": "st-1", "line_id": "7", "merchant_id": "m-1",
        "payment_reference": "pay-1", "currency": "EUR", "amount_minor": 1250,
        "value_date": "2026-05-28", "booking_date": "2026-05-28",
    }  # fmt: skip
    return base | overrides


def test_a_credit_is_positive_and_a_debit_negative() -> None:
    credit = ev.BankStatementLine.model_validate(line())
    assert credit.signed_minor == 1250 and credit.line_key == "st-1/7"
    debit = ev.BankStatementLine.model_validate(line(direction="DEBIT"))
    assert debit.signed_minor == -1250


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"merchant_id": ""}, "merchant_id"),
        ({"currency": "XXZ"}, "currency"),
        ({"amount_minor": -5}, "amount_minor"),
        ({"amount_minor": 0}, "amount_minor"),
        ({"amount_minor": 12.5}, "amount_minor"),
        ({"value_date": "28/05/2026"}, "value_date"),
        ({"direction": "SIDEWAYS"}, "direction"),
    ],
)
def test_invalid_lines_are_refused_with_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        ev.BankStatementLine.model_validate(line(**overrides))
    assert field in {str(e["loc"][0]) for e in info.value.errors()}


def test_round_trips_through_the_avro_contract() -> None:
    codec = AvroCodec(SchemaRegistry())
    raw = codec.encode("BankStatementLine", line(direction="DEBIT"))
    back = ev.BankStatementLine.model_validate(codec.decode(raw, "BankStatementLine"))
    assert back == ev.BankStatementLine.model_validate(line(direction="DEBIT"))
    # a line without `direction` is a credit (the default of the schema and the model)
    old = ev.BankStatementLine.model_validate(line())
    assert old.direction is ev.BankDirection.CREDIT
