"""Reconciliation of what paysaga moved against what the bank reports: the matching rules.

Pure domain code (no Faust, no Kafka, no storage): the reconciliation agent keeps the
entries in its RocksDB table and calls these functions; docs/reconciliation.md gives the
design. Money is integer minor units; a refund is a negative movement, as on a statement.

Matching comes in two tiers, as a payment operations team does it by hand:

1. **By reference**, when a bank line arrives (`match_by_reference`): the line's
   `payment_reference` names a movement's gateway reference or its payment id. Of the
   movements it names, an unmatched one with the same amount and currency is a match; a
   second line for a movement already matched with the same amount is `DUPLICATE_IN_BANK`;
   an unmatched one of the same sign with another currency or amount is a
   `CURRENCY_MISMATCH` or `AMOUNT_MISMATCH` (both sides are then accounted for, by the
   discrepancy). Each movement and each line is matched at most once.
2. **By amount, currency and value date**, at the window's close, over what tier 1 left
   (`match_by_amount`): a line pairs with a movement of the same amount and currency whose
   value dates are at most `tolerance_days` apart, only when the pairing is unique in both
   directions; a line that could be several movements is `AMBIGUOUS_MATCH`, never a guess.

What is left then is `MISSING_IN_BANK` (a movement without its line) and
`MISSING_INTERNAL` (a line without its movement). Every discrepancy has a deterministic id
(`discrepancy_id`), so a replay, a re-close after a crash and a revision name the same
problem the same way, and a revision says which earlier problems it resolved (`revise`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from paysaga.domain.payment import derived_id

HOUR_MS = 3600 * 1000
DAY_MS = 24 * HOUR_MS


@dataclass(frozen=True)
class ReconPolicy:
    """Window length, how late the bank may be (grace), and tier 2's value-date tolerance."""

    window_ms: int = HOUR_MS
    grace_ms: int = 2 * HOUR_MS
    tolerance_days: int = 1
    #: How long a closed window's entries are kept for adjustments, after its close.
    retention_ms: int = 7 * DAY_MS

    def __post_init__(self) -> None:
        if (self.window_ms <= 0 or self.grace_ms < 0 or self.tolerance_days < 0
                or self.retention_ms < 0):  # fmt: skip
            raise ValueError(f"invalid reconciliation policy {self}")

    def closes_at(self, start: int) -> int:
        """Stream time at which the window starting at `start` closes."""
        return start + self.window_ms + self.grace_ms

    def purged_at(self, start: int) -> int:
        """Stream time at which the closed window's entries are forgotten."""
        return self.closes_at(start) + self.retention_ms

    def expired(self, ts: int, stream_time: int) -> bool:
        """Is the window of event time `ts` past its retention (nothing left to adjust)?"""
        return self.purged_at(window_start(ts, self.window_ms)) <= stream_time


class Category(StrEnum):
    """What reconciliation found for a movement or a bank line."""

    MATCHED = "MATCHED"
    MISSING_IN_BANK = "MISSING_IN_BANK"
    MISSING_INTERNAL = "MISSING_INTERNAL"
    AMOUNT_MISMATCH = "AMOUNT_MISMATCH"
    CURRENCY_MISMATCH = "CURRENCY_MISMATCH"
    DUPLICATE_IN_BANK = "DUPLICATE_IN_BANK"
    AMBIGUOUS_MATCH = "AMBIGUOUS_MATCH"


#: Every category but MATCHED is a discrepancy.
DISCREPANCIES = tuple(c for c in Category if c is not Category.MATCHED)


class Movement(BaseModel):
    """Money paysaga moved: a capture (positive) or a refund (negative), once per id.

    A gateway answers a retried command with the same event, so the id is the gateway's
    capture or reversal id: the same capture seen twice is one movement."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    movement_id: str
    payment_id: str
    reference: str
    amount_minor: int
    currency: str
    value_date: str
    occurred_at: int


class Line(BaseModel):
    """One bank statement line, identified by statement and line id."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    line_key: str
    reference: str | None
    amount_minor: int
    currency: str
    value_date: str
    occurred_at: int


def window_start(ts_ms: int, size_ms: int) -> int:
    """The start of the epoch-aligned window holding `ts_ms` (tumbling, end exclusive)."""
    if size_ms <= 0:
        raise ValueError(f"window size must be positive, not {size_ms}")
    return ts_ms - ts_ms % size_ms


def utc_date(ts_ms: int) -> str:
    """The UTC calendar date of an epoch-millis time, as a bank writes a value date."""
    return datetime.fromtimestamp(ts_ms / 1000, UTC).date().isoformat()


def _days_apart(a: str, b: str) -> int:
    return abs((date.fromisoformat(a) - date.fromisoformat(b)).days)


def names(line: Line, movement: Movement) -> bool:
    """Does the line's reference name this movement (gateway reference or payment id)?"""
    return line.reference is not None and line.reference in (movement.reference,
                                                              movement.payment_id)  # fmt: skip


@dataclass(frozen=True)
class Candidate:
    """A movement a line's reference names, and whether a line already matched it."""

    movement: Movement
    matched: bool


@dataclass(frozen=True)
class RefMatch:
    """What a line's reference decided: the category and the movement it concerns."""

    category: Category
    movement: Movement


def _order(m: Movement) -> tuple[int, str]:
    return m.occurred_at, m.movement_id


def match_by_reference(line: Line, candidates: Iterable[Candidate]) -> RefMatch | None:
    """Tier 1 for one arriving line against the movements its reference names.

    None: the reference names nothing usable, and the line waits for tier 2 at close."""
    named = sorted((c for c in candidates if names(line, c.movement)),
                   key=lambda c: _order(c.movement))  # fmt: skip
    exact = [c.movement for c in named
             if c.movement.amount_minor == line.amount_minor
             and c.movement.currency == line.currency]  # fmt: skip
    free = [c for c in named if not c.matched]
    for c in free:
        if c.movement in exact:
            return RefMatch(Category.MATCHED, c.movement)
    for c in named:
        if c.matched and c.movement in exact:
            return RefMatch(Category.DUPLICATE_IN_BANK, c.movement)
    same_sign = [
        c.movement for c in free if (c.movement.amount_minor > 0) == (line.amount_minor > 0)
    ]
    if not same_sign:
        return None
    m = same_sign[0]
    kind = Category.CURRENCY_MISMATCH if m.currency != line.currency else Category.AMOUNT_MISMATCH
    return RefMatch(kind, m)


@dataclass(frozen=True)
class AmountMatches:
    """Tier 2's result: unique pairs, and lines that could be several movements."""

    pairs: tuple[tuple[Line, Movement], ...]
    #: (line, the movements it could be), each sorted.
    ambiguous: tuple[tuple[Line, tuple[Movement, ...]], ...]


def match_by_amount(
    lines: Sequence[Line], movements: Sequence[Movement], tolerance_days: int
) -> AmountMatches:
    """Tier 2 over what tier 1 left in one window: unique pairings by amount, currency and
    value date within `tolerance_days`. The result does not depend on the input order."""
    if tolerance_days < 0:
        raise ValueError(f"tolerance must not be negative, not {tolerance_days}")
    ms = sorted(movements, key=_order)
    ls = sorted(lines, key=lambda x: (x.occurred_at, x.line_key))
    wanted: dict[str, list[Line]] = defaultdict(list)
    options: dict[str, list[Movement]] = {}
    for line in ls:
        fits = [m for m in ms
                if m.amount_minor == line.amount_minor and m.currency == line.currency
                and _days_apart(m.value_date, line.value_date) <= tolerance_days]  # fmt: skip
        options[line.line_key] = fits
        for m in fits:
            wanted[m.movement_id].append(line)
    pairs: list[tuple[Line, Movement]] = []
    ambiguous: list[tuple[Line, tuple[Movement, ...]]] = []
    for line in ls:
        fits = options[line.line_key]
        if len(fits) == 1 and len(wanted[fits[0].movement_id]) == 1:
            pairs.append((line, fits[0]))
        elif fits:
            rivals = {m.movement_id: m for m in fits}
            for m in fits:  # a movement several lines want is as uncertain as they are
                for other in wanted[m.movement_id]:
                    if other is not line:
                        rivals.update((x.movement_id, x) for x in options[other.line_key])
            ambiguous.append((line, tuple(sorted(rivals.values(), key=_order))))
    return AmountMatches(tuple(pairs), tuple(ambiguous))


class Discrepancy(BaseModel):
    """One problem found in a window, with the movement and line it concerns."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    discrepancy_id: str
    category: Category
    merchant_id: str
    currency: str
    window_start: int
    payment_id: str | None = None
    movement_id: str | None = None
    line_key: str | None = None
    internal_minor: int | None = None
    bank_minor: int | None = None
    bank_currency: str | None = None


def discrepancy(
    category: Category,
    merchant_id: str,
    currency: str,
    window: int,
    movement: Movement | None = None,
    line: Line | None = None,
) -> Discrepancy:
    """The discrepancy of `category` about `movement` and/or `line`, with its stable id."""
    if category is Category.MATCHED:
        raise ValueError("a match is not a discrepancy")
    if movement is None and line is None:
        raise ValueError("a discrepancy concerns a movement, a line or both")
    mid = None if movement is None else movement.movement_id
    lkey = None if line is None else line.line_key
    return Discrepancy(
        discrepancy_id=derived_id(
            "recon", merchant_id, currency, str(window), category.value, mid or "-", lkey or "-"
        ),
        category=category,
        merchant_id=merchant_id,
        currency=currency,
        window_start=window,
        payment_id=None if movement is None else movement.payment_id,
        movement_id=mid,
        line_key=lkey,
        internal_minor=None if movement is None else movement.amount_minor,
        bank_minor=None if line is None else line.amount_minor,
        bank_currency=None if line is None else line.currency,
    )


def report_id(merchant_id: str, currency: str, window: int, revision: int) -> str:
    """The id of revision `revision` of a window's report (the first close is revision 1)."""
    return derived_id("recon-report", merchant_id, currency, str(window), str(revision))


@dataclass(frozen=True)
class Revision:
    """How one report revision differs from the one before: problems found, problems gone."""

    found: tuple[Discrepancy, ...]
    resolved: tuple[str, ...]


def revise(previous_ids: Iterable[str], current: Iterable[Discrepancy]) -> Revision:
    """Compare a window's discrepancies now with the ids its last report gave."""
    before = set(previous_ids)
    now = sorted(current, key=lambda d: d.discrepancy_id)
    ids = {d.discrepancy_id for d in now}
    return Revision(
        found=tuple(d for d in now if d.discrepancy_id not in before),
        resolved=tuple(sorted(before - ids)),
    )


__all__ = [
    "DAY_MS", "DISCREPANCIES", "HOUR_MS", "AmountMatches", "Candidate", "Category",
    "Discrepancy", "Line", "Movement", "ReconPolicy", "RefMatch", "Revision", "discrepancy",
    "match_by_amount", "match_by_reference", "names", "report_id", "revise", "utc_date",
    "window_start",
]  # fmt: skip
