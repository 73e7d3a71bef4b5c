"""Keep card numbers out: detect a PAN (Luhn-valid 13-19 digits) and redact it from text.

paysaga carries a card token, BIN and last4 at most. Anything that looks like a full PAN is
rejected at the edge, and every error text that could echo input goes through `redact`.
"""

from __future__ import annotations

import re

#: 13-19 digits, optionally grouped by single spaces or dashes, not inside a longer number.
_PAN_RUN = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")
_SEPARATORS = re.compile(r"[ -]")
REDACTED = "[REDACTED-PAN]"


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def looks_like_pan(text: str) -> bool:
    """True if `text` (spaces/dashes removed) is 13-19 digits and passes the Luhn check."""
    digits = _SEPARATORS.sub("", text)
    return 13 <= len(digits) <= 19 and digits.isdigit() and luhn_valid(digits)


def contains_pan(text: str) -> bool:
    """True if any digit run in free text looks like a PAN."""
    return any(looks_like_pan(m.group()) for m in _PAN_RUN.finditer(text))


def redact(text: str) -> str:
    """`text` with every PAN-looking digit run replaced by a marker."""
    return _PAN_RUN.sub(lambda m: REDACTED if looks_like_pan(m.group()) else m.group(), text)
