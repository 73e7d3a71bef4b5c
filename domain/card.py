"""Detect and redact primary account numbers (PANs) in text.

PCI DSS keeps full card numbers out of anything we store or print: events, tables, logs and
error messages. Only a token, the BIN and the last four digits may travel. These helpers are
the last line of defence: validators reject fields that carry a PAN, and anything echoed in a
log line or a DLQ reason goes through :func:`redact` first.

A "PAN" here is 13-19 digits (ISO/IEC 7812 lengths) that pass the Luhn check, optionally
grouped with single spaces or dashes ("4111 1111 1111 1111", "4111-1111-1111-1111").
Digits are any Unicode decimal digits (``\\d`` in `re`), not only ASCII.

Pure module: no Faust or Kafka imports.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["CARD_DATA_NAMES", "MAX_DEPTH", "REDACTED", "TooDeep", "card_data_paths",
           "contains_pan", "looks_like_pan", "luhn_valid", "pan_spans", "redact"]  # fmt: skip

REDACTED = "[REDACTED-PAN]"

_MIN_DIGITS = 13
_MAX_DIGITS = 19

#: A maximal run of digit groups joined by single spaces or dashes.
_RUN_RE = re.compile(r"\d+(?:[ -]\d+)*")
_GROUP_RE = re.compile(r"\d+")
_ASCII_DIGITS = b"0123456789"
_SEPARATORS = str.maketrans("", "", " -")


def luhn_valid(digits: str) -> bool:
    """Luhn (mod 10) check of a non-empty string of ASCII digits."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _is_pan_digits(digits: str) -> bool:
    # Any Unicode decimal digit counts (fullwidth or Arabic-Indic digits are still a card
    # number to Python's int() and to many systems downstream): map them to ASCII first.
    if not (_MIN_DIGITS <= len(digits) <= _MAX_DIGITS and digits.isdecimal()):
        return False
    if not digits.isascii():
        digits = "".join(str(unicodedata.decimal(ch)) for ch in digits)
    return luhn_valid(digits)


def _too_few_digits(text: str) -> bool:
    """Cheap pre-filter (C speed): fewer than 13 digits in all of ``text`` means no PAN.

    Most text on the hot path (tokens, descriptions) stops here; a regex scan costs 5-10x.
    Non-ASCII text always gets the full scan (Unicode digits are not counted here).
    """
    if len(text) < _MIN_DIGITS:
        return True
    if not text.isascii():
        return False
    raw = text.encode("ascii")
    return len(raw) - len(raw.translate(None, _ASCII_DIGITS)) < _MIN_DIGITS


def looks_like_pan(s: str) -> bool:
    """True if ``s`` as a whole, without spaces and dashes, is a Luhn-valid 13-19 digit number."""
    if _too_few_digits(s):
        return False
    return _is_pan_digits(s.translate(_SEPARATORS))


def pan_spans(text: str) -> list[tuple[int, int]]:
    """Return the ``(start, end)`` spans of ``text`` that hold a PAN, in order, non-overlapping.

    Within a run of digit groups, every sequence of consecutive groups totalling 13-19 digits
    is checked, so two card numbers separated by a space ("4111... 4242...") or a PAN followed
    by other numbers are still found. Digits are never split inside a group: a long unbroken
    number (say a 24-digit reference) is not a PAN, and checking its substrings would flag
    most long numbers by chance (one window in ten passes Luhn).
    """
    if _too_few_digits(text):
        return []
    spans: list[tuple[int, int]] = []
    for run in _RUN_RE.finditer(text):
        run_text = run.group()
        if len(run_text) < _MIN_DIGITS:
            continue
        groups = [(m.start(), m.end()) for m in _GROUP_RE.finditer(run_text)]
        offset = run.start()
        for i, (start, _) in enumerate(groups):
            digits = ""
            for j in range(i, len(groups)):
                g_start, g_end = groups[j]
                digits += run_text[g_start:g_end]
                if len(digits) > _MAX_DIGITS:
                    break
                if len(digits) >= _MIN_DIGITS and _is_pan_digits(digits):
                    spans.append((offset + start, offset + g_end))
    return _merge(spans)


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    spans.sort()
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def contains_pan(text: str) -> bool:
    """True if any part of free ``text`` holds a PAN (see :func:`pan_spans`)."""
    return bool(pan_spans(text))


def redact(text: str) -> str:
    """Replace every PAN in ``text`` with ``[REDACTED-PAN]``; other text is left as is."""
    spans = pan_spans(text)
    if not spans:
        return text
    parts: list[str] = []
    last = 0
    for start, end in spans:
        parts.append(text[last:start])
        parts.append(REDACTED)
        last = end
    parts.append(text[last:])
    return "".join(parts)


#: Names under which a request may carry raw card data (normalised: lower case, letters
#: and digits only): a card number, its security code or its expiry. The payments API
#: refuses a body holding any of them, whatever the value, since it takes a card token.
CARD_DATA_NAMES = frozenset({
    "number", "cardnumber", "pan", "primaryaccountnumber", "accountnumber",
    "cvc", "cvv", "cvc2", "cvv2", "cid", "csc", "securitycode", "cardsecuritycode",
    "exp", "expmonth", "expyear", "expiry", "expirydate", "expiration", "expirationdate",
    "expirationmonth", "expirationyear",
})  # fmt: skip


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


#: How deep `card_data_paths` looks into a JSON value; deeper is refused as such (no
#: request paysaga takes nests more than four levels).
MAX_DEPTH = 32


class TooDeep(ValueError):
    """A JSON value nested deeper than `MAX_DEPTH`."""


def card_data_paths(value: object, path: str = "", depth: int = 0) -> list[str]:
    """The paths (`card.number`, `items.0.cvc`) of every key in a JSON value that names
    raw card data, and of every string that holds a card number, in document order.
    Paths name keys only, never values, and are redacted themselves (a key can be a card
    number). Raises `TooDeep` past `MAX_DEPTH` levels."""
    if depth > MAX_DEPTH:
        raise TooDeep(f"nested deeper than {MAX_DEPTH} levels")
    found: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            here = f"{path}.{k}" if path else str(k)
            if _norm(str(k)) in CARD_DATA_NAMES:
                found.append(redact(here))
            else:
                found.extend(card_data_paths(v, here, depth + 1))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found.extend(card_data_paths(v, f"{path}.{i}" if path else str(i), depth + 1))
    elif isinstance(value, str) and contains_pan(value):
        found.append(redact(path) if path else "body")
    return found
