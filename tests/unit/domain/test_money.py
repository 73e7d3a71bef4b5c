"""Money: ISO 4217 exponents, amount limits per exponent, integer-only arithmetic."""

from __future__ import annotations

import pytest

from paysaga.domain.money import (
    MAX_MAJOR_UNITS,
    Money,
    MoneyError,
    currency_exponent,
    max_amount_minor,
    validate_amount,
)


@pytest.mark.parametrize(("code", "exponent"), [("JPY", 0), ("USD", 2), ("BHD", 3), ("CLF", 4)])
def test_exponents_come_from_iso4217(code: str, exponent: int) -> None:
    assert currency_exponent(code) == exponent


def test_unknown_currency() -> None:
    with pytest.raises(MoneyError, match=r"unknown currency 'ABC' \(not in ISO 4217\)"):
        currency_exponent("ABC")


@pytest.mark.parametrize("code", ["XAU", "XXX", "XDR"])
def test_currencies_without_minor_unit_are_not_payable(code: str) -> None:
    with pytest.raises(MoneyError, match=f"currency '{code}' has no minor unit and is not payable"):
        currency_exponent(code)


@pytest.mark.parametrize("code", ["usd", "US", "USDX", "", "U$D"])
def test_only_uppercase_three_letter_codes(code: str) -> None:
    with pytest.raises(MoneyError, match="3 uppercase letters"):
        currency_exponent(code)


def test_non_string_currency() -> None:
    with pytest.raises(MoneyError, match="must be a string"):
        currency_exponent(840)  # type: ignore[arg-type]


def test_validate_amount_accepts_normal_amounts() -> None:
    validate_amount(1, "USD")
    validate_amount(1234, "JPY")
    validate_amount(max_amount_minor("BHD"), "BHD")


def test_negative_amount() -> None:
    with pytest.raises(MoneyError, match=r"^amount_minor -5 is negative$"):
        validate_amount(-5, "USD")


def test_zero_only_when_allowed() -> None:
    with pytest.raises(MoneyError, match="0"):
        validate_amount(0, "USD")
    validate_amount(0, "USD", allow_zero=True)


@pytest.mark.parametrize(("code", "limit"), [("JPY", 10**7), ("USD", 10**9), ("BHD", 10**10)])
def test_limit_scales_with_the_exponent(code: str, limit: int) -> None:
    assert max_amount_minor(code) == limit == MAX_MAJOR_UNITS * 10 ** currency_exponent(code)
    validate_amount(limit, code)
    with pytest.raises(MoneyError, match="exceeds the maximum"):
        validate_amount(limit + 1, code)


def test_oversized_message_names_the_limit() -> None:
    with pytest.raises(MoneyError) as info:
        validate_amount(10_000_000_001, "JPY")
    assert str(info.value) == (
        "amount_minor 10000000001 exceeds the maximum of 10000000 for JPY (10000000 major units)"
    )


def test_custom_maximum() -> None:
    validate_amount(500, "USD", max_major_units=5)
    with pytest.raises(MoneyError, match="maximum of 500 for USD"):
        validate_amount(501, "USD", max_major_units=5)


@pytest.mark.parametrize("bad", [True, False, 1.0, "100", None])
def test_bool_float_str_rejected(bad: object) -> None:
    with pytest.raises(MoneyError, match="must be an integer"):
        validate_amount(bad, "USD")  # type: ignore[arg-type]


def test_unknown_currency_reported_before_the_amount() -> None:
    with pytest.raises(MoneyError, match="unknown currency"):
        validate_amount(-1, "ZZZ")


def test_money_add_sub_same_currency() -> None:
    a, b = Money(1050, "USD"), Money(25, "USD")
    assert a + b == Money(1075, "USD")
    assert a - b == Money(1025, "USD")
    assert Money.zero("USD") + a == a


def test_money_mixed_currencies_rejected() -> None:
    with pytest.raises(MoneyError, match="cannot add EUR and USD"):
        _ = Money(1, "USD") + Money(1, "EUR")
    with pytest.raises(MoneyError, match="cannot subtract"):
        _ = Money(1, "USD") - Money(1, "EUR")
    with pytest.raises(MoneyError):
        _ = Money(1, "USD") + 1  # type: ignore[operator]


def test_money_never_negative() -> None:
    with pytest.raises(MoneyError, match="negative"):
        _ = Money(5, "USD") - Money(6, "USD")
    with pytest.raises(MoneyError, match="negative"):
        Money(-1, "USD")


@pytest.mark.parametrize("bad", [True, 1.5, "10"])
def test_money_rejects_non_int(bad: object) -> None:
    with pytest.raises(MoneyError):
        Money(bad, "USD")  # type: ignore[arg-type]


def test_money_rejects_bad_currency() -> None:
    with pytest.raises(MoneyError):
        Money(1, "XAU")


def test_money_is_frozen() -> None:
    m = Money(1, "USD")
    with pytest.raises(AttributeError):
        m.amount_minor = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("money", "text"),
    [
        (Money(1234, "USD"), "12.34 USD"),
        (Money(5, "USD"), "0.05 USD"),
        (Money(0, "EUR"), "0.00 EUR"),
        (Money(1234, "JPY"), "1234 JPY"),
        (Money(1234, "BHD"), "1.234 BHD"),
        (Money(1, "CLF"), "0.0001 CLF"),
        (Money(10**20 + 1, "USD"), "1000000000000000000.01 USD"),
    ],
)
def test_format_uses_integer_arithmetic(money: Money, text: str) -> None:
    assert money.format() == text == str(money)
