"""Money in integer minor units with ISO 4217 exponents.

Amounts are ``int`` minor units everywhere (never floats: binary floating point cannot
represent most decimal fractions, and rounding errors in money are bugs). The number of
minor units per major unit comes from ISO 4217 (JPY 0, USD 2, BHD 3, CLF 4), so limits and
formatting are correct for every currency instead of a hard-coded handful.

Pure module: no Faust or Kafka imports, so it is unit-testable and replays deterministically.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from iso4217 import Currency

__all__ = [
    "MAX_MAJOR_UNITS",
    "Money",
    "MoneyError",
    "currency_exponent",
    "max_amount_minor",
    "payable_currencies",
    "validate_amount",
]

#: Largest single payment we accept, in major units (per currency). Guards against unit
#: mistakes (major sent as minor, an extra zero) and against overflow in downstream systems.
MAX_MAJOR_UNITS = 10_000_000

_CODE_RE = re.compile(r"[A-Z]{3}")


class MoneyError(ValueError):
    """An amount or currency that must not enter the system.

    Subclasses ``ValueError`` so pydantic validators turn it into a validation error.
    Messages never contain anything but the offending amount or currency code.
    """


def currency_exponent(code: str) -> int:
    """Return the ISO 4217 minor-unit exponent of a payable currency (JPY 0, USD 2, BHD 3).

    Only uppercase three-letter codes are accepted: silently upper-casing would let two
    spellings of one currency into keys and aggregations. Codes without a minor unit in
    ISO 4217 (XAU, XXX, XDR, ...) are funds or test codes, not payable currencies.
    """
    if not isinstance(code, str):
        raise MoneyError(f"currency must be a string, got {type(code).__name__}")
    return _exponent(code)


@functools.cache
def _exponent(code: str) -> int:
    # Cached: this runs for every event on the hot path; the table never changes at runtime.
    # Only successful lookups are cached (exceptions are not), so bad input cannot grow it.
    if _CODE_RE.fullmatch(code) is None:
        raise MoneyError(f"currency {_short(code)!r} must be 3 uppercase letters (ISO 4217)")
    try:
        exponent = Currency(code).exponent
    except ValueError:
        raise MoneyError(f"unknown currency {code!r} (not in ISO 4217)") from None
    if exponent is None:
        raise MoneyError(f"currency {code!r} has no minor unit and is not payable")
    return int(exponent)


def payable_currencies() -> list[str]:
    """Every code `currency_exponent` accepts, sorted (the API's description lists them)."""
    return sorted(c.code for c in Currency if c.exponent is not None and _CODE_RE.fullmatch(c.code))


def _short(text: str) -> str:
    """Bound the length of caller input echoed in an error message."""
    return text if len(text) <= 8 else text[:8] + "..."


def max_amount_minor(currency: str, max_major_units: int = MAX_MAJOR_UNITS) -> int:
    """Largest accepted amount in minor units for ``currency``."""
    return max_major_units * 10 ** currency_exponent(currency)


def validate_amount(
    amount_minor: int,
    currency: str,
    *,
    max_major_units: int = MAX_MAJOR_UNITS,
    allow_zero: bool = False,
) -> None:
    """Check a single payment amount; raise :class:`MoneyError` when it must be rejected.

    ``bool`` is rejected although it subclasses ``int``: ``True`` as an amount is always a
    bug upstream. Zero is rejected unless ``allow_zero`` (a payment of nothing is not a
    payment; running totals may be zero). The currency is validated first so the limit can
    be expressed per exponent.
    """
    exponent = currency_exponent(currency)
    if isinstance(amount_minor, bool) or not isinstance(amount_minor, int):
        raise MoneyError(f"amount_minor must be an integer, got {type(amount_minor).__name__}")
    if amount_minor < 0:
        raise MoneyError(f"amount_minor {amount_minor} is negative")
    if amount_minor == 0 and not allow_zero:
        raise MoneyError("amount_minor 0 is not allowed (must be positive)")
    limit = max_major_units * 10**exponent
    if amount_minor > limit:
        raise MoneyError(
            f"amount_minor {amount_minor} exceeds the maximum of {limit} for {currency} "
            f"({max_major_units} major units)"
        )


@dataclass(frozen=True, slots=True)
class Money:
    """A non-negative amount in minor units of one ISO 4217 currency.

    Arithmetic only within one currency: adding USD to EUR is a bug, not a conversion.
    There is no upper bound here (totals of many payments may exceed the per-payment cap);
    per-payment limits belong to :func:`validate_amount` at the edge. Negative results are
    rejected because in this domain they always mean "refunded more than captured".
    """

    amount_minor: int
    currency: str

    def __post_init__(self) -> None:
        currency_exponent(self.currency)
        if isinstance(self.amount_minor, bool) or not isinstance(self.amount_minor, int):
            raise MoneyError(
                f"amount_minor must be an integer, got {type(self.amount_minor).__name__}"
            )
        if self.amount_minor < 0:
            raise MoneyError(f"amount_minor {self.amount_minor} is negative")

    @classmethod
    def zero(cls, currency: str) -> Money:
        """The neutral element for sums in ``currency``."""
        return cls(0, currency)

    def _same_currency(self, other: object, op: str) -> Money:
        if not isinstance(other, Money):
            raise MoneyError(f"cannot {op} {type(other).__name__} and Money")
        if other.currency != self.currency:
            raise MoneyError(f"cannot {op} {other.currency} and {self.currency}")
        return other

    def __add__(self, other: Money) -> Money:
        o = self._same_currency(other, "add")
        return Money(self.amount_minor + o.amount_minor, self.currency)

    def __sub__(self, other: Money) -> Money:
        o = self._same_currency(other, "subtract")
        result = self.amount_minor - o.amount_minor
        if result < 0:
            raise MoneyError(
                f"subtracting {o.format()} from {self.format()} would make money negative"
            )
        return Money(result, self.currency)

    @property
    def exponent(self) -> int:
        """Minor-unit exponent of this money's currency."""
        return currency_exponent(self.currency)

    def format(self) -> str:
        """Render as ``"12.34 USD"`` / ``"1234 JPY"`` / ``"1.234 BHD"`` with integer math only."""
        exponent = self.exponent
        if exponent == 0:
            return f"{self.amount_minor} {self.currency}"
        major, minor = divmod(self.amount_minor, 10**exponent)
        return f"{major}.{minor:0{exponent}d} {self.currency}"

    def __str__(self) -> str:
        return self.format()
