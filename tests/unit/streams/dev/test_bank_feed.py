"""The bank feed's decisions (streams/dev/bank.py): deterministic, at the configured rates."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from paysaga.schemas.events import BankStatementLine
from paysaga.streams.dev.bank import FATES, BankConfig, bank_config, line_fate, statement_lines


def cap(n: int) -> dict[str, Any]:
    return {"capture_id": f"cap_{n}", "merchant_id": "m1", "occurred_at": 1_790_000_000_000,
            "gateway_reference": f"ch_{n}", "amount_minor": 1000 + n,
            "currency": "EUR"}  # fmt: skip


def test_the_same_capture_gives_the_same_lines() -> None:
    config = BankConfig(duplicate_rate=0.5, extra_rate=0.5)
    assert statement_lines(config, cap(1)) == statement_lines(config, cap(1))


def test_fates_follow_their_rates() -> None:
    config = BankConfig(missing_rate=0.1, misstated_rate=0.1, currency_rate=0.1, duplicate_rate=0.1,
                        late_rate=0.1, unreferenced_rate=0.1, extra_rate=0.1)  # fmt: skip
    fates = Counter(line_fate(config, f"cap_{n}") for n in range(10_000))
    for fate in FATES:
        assert 850 < fates[fate] < 1150, fates
    assert 3_700 < fates["ok"] < 4_300


def test_each_fate_shapes_its_lines() -> None:
    for fate in FATES:
        rates = {f"{f}_rate": 1.0 if f == fate else 0.0 for f in FATES}
        config = bank_config(**rates, extra_rate=0.0, lag_ms=100, late_ms=9_000)
        lines, labels = statement_lines(config, cap(7))
        assert labels == [fate]
        c = cap(7)
        if fate == "missing":
            assert lines == []
            continue
        due, first = lines[0]
        assert due == first["occurred_at"] == c["occurred_at"] + (9_000 if fate == "late" else 100)
        assert first["value_date"] == "2026-09-21" and first["merchant_id"] == "m1"
        assert (first["amount_minor"] != c["amount_minor"]) == (fate == "misstated")
        assert (first["currency"] != "EUR") == (fate == "currency")
        assert (first["payment_reference"] is None) == (fate == "unreferenced")
        assert len(lines) == (2 if fate == "duplicate" else 1)


def test_an_extra_line_names_no_capture() -> None:
    rates = {f"{f}_rate": 0.0 for f in FATES}
    config = bank_config(**rates | {"missing_rate": 1.0}, extra_rate=1.0)
    lines, labels = statement_lines(config, cap(3))
    assert labels == ["missing", "extra"]
    ((_, extra),) = lines
    assert extra["payment_reference"].startswith("unknown-")


def test_invalid_configs_are_refused() -> None:
    with pytest.raises(ValueError):
        BankConfig(missing_rate=1.5)
    with pytest.raises(ValueError):
        BankConfig(missing_rate=0.6, misstated_rate=0.6)
    with pytest.raises(ValueError):
        BankConfig(lag_ms=10, late_ms=5)


def test_a_refund_is_a_debit_line_of_its_positive_amount() -> None:
    config = bank_config(**{f"{f}_rate": 0.0 for f in FATES}, extra_rate=0.0)
    refund = {**cap(1), "capture_id": "rev-1", "gateway_reference": "pay-1", "direction": "DEBIT"}
    [(_, line)] = statement_lines(config, refund)[0]
    assert (line["direction"], line["amount_minor"]) == ("DEBIT", refund["amount_minor"])
    assert line["payment_reference"] == "pay-1"
    assert BankStatementLine.model_validate(line).signed_minor == -refund["amount_minor"]
