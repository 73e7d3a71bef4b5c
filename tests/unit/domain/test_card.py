"""PAN detection and redaction: what keeps card numbers out of events, logs and reasons."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from paysaga.domain.card import REDACTED, contains_pan, looks_like_pan, luhn_valid, redact

VISA = "4111111111111111"
MASTERCARD = "5555555555554444"
AMEX = "378282246310005"  # 15 digits
VISA_13 = "4222222222222"  # 13 digits


def _luhn_complete(prefix: str) -> str:
    """``prefix`` plus the check digit that makes it Luhn-valid."""
    for d in "0123456789":
        if luhn_valid(prefix + d):
            return prefix + d
    raise AssertionError("unreachable")


@pytest.mark.parametrize(
    "pan", [VISA, MASTERCARD, AMEX, VISA_13, _luhn_complete("601100099013942412")]
)
def test_known_pans(pan: str) -> None:
    assert 13 <= len(pan) <= 19
    assert looks_like_pan(pan)
    assert contains_pan(f"card {pan} declined")


@pytest.mark.parametrize(
    "form", ["4111 1111 1111 1111", "4111-1111-1111-1111", "41111111 11111111"]
)
def test_separators(form: str) -> None:
    assert looks_like_pan(form)
    assert contains_pan(f"x {form} y")
    assert redact(f"x {form} y") == f"x {REDACTED} y"


@pytest.mark.parametrize(
    "text",
    [
        "4111111111111112",  # Luhn-invalid
        "411111111111",  # 12 digits
        _luhn_complete("4" * 19),  # 20 digits
        "tok_4111111111111111x",  # not only digits
        "",
        "abc",
    ],
)
def test_not_a_pan_as_a_whole(text: str) -> None:
    assert not looks_like_pan(text)


def test_free_text_without_pan() -> None:
    for text in ["order 12345", "call 555-0100", "ref 2024-01-31", "tok_0123456789abcdef", ""]:
        assert not contains_pan(text)
        assert redact(text) == text


def test_pan_inside_text_and_next_to_letters() -> None:
    assert contains_pan(f"card{VISA}x")
    assert redact(f"card{VISA}x") == f"card{REDACTED}x"


def test_two_pans_in_one_run_are_both_found() -> None:
    text = f"{VISA} {MASTERCARD}"
    assert contains_pan(text)
    out = redact(text)
    assert VISA not in out and MASTERCARD not in out and "1111" not in out


def test_grouped_pans_back_to_back() -> None:
    text = "4111 1111 1111 1111 5555 5555 5555 4444"
    out = redact(text)
    assert "4111" not in out and "4444" not in out


def test_long_unbroken_number_is_not_split() -> None:
    # A 24-digit reference is not a PAN; scanning its substrings would flag most numbers.
    assert not contains_pan("ref 123456789012345678901234")


def test_unicode_digits_count() -> None:
    fullwidth = "".join(chr(0xFF10 + int(d)) for d in VISA)  # FULLWIDTH DIGIT ZERO..NINE
    assert looks_like_pan(fullwidth)
    assert contains_pan(f"card {fullwidth}")
    assert fullwidth not in redact(f"card {fullwidth}")


def test_luhn() -> None:
    assert luhn_valid("79927398713")
    assert not luhn_valid("79927398710")


@given(st.text(alphabet="0123456789 -abc", max_size=80))
def test_redacted_text_never_contains_a_pan(text: str) -> None:
    assert not contains_pan(redact(text))


@given(st.integers(min_value=10**11, max_value=10**18 - 1))
def test_any_luhn_valid_number_is_redacted(n: int) -> None:
    pan = _luhn_complete(str(n))
    assert looks_like_pan(pan)
    assert pan not in redact(f"number: {pan}.")
