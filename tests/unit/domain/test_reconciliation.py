"""The reconciliation matching rules (domain/reconciliation.py), without storage or Kafka."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from paysaga.domain.reconciliation import (
    DAY_MS,
    Candidate,
    Category,
    Line,
    Movement,
    discrepancy,
    match_by_amount,
    match_by_reference,
    report_id,
    revise,
    utc_date,
    window_start,
)

T0 = 1_780_000_000_000  # 2026-05-28


def mv(n: int, amount: int = 1000, currency: str = "EUR", day: int = 0, pay: str = "") -> Movement:
    return Movement(movement_id=f"cap-{n}", payment_id=pay or f"pay-{n}", reference=f"gw-{n}",
                    amount_minor=amount, currency=currency, value_date=utc_date(T0 + day * DAY_MS),
                    occurred_at=T0 + n)  # fmt: skip


def ln(n: int, ref: str | None, amount: int = 1000, currency: str = "EUR", day: int = 0) -> Line:
    return Line(line_key=f"st-1/{n}", reference=ref, amount_minor=amount, currency=currency,
                value_date=utc_date(T0 + day * DAY_MS), occurred_at=T0 + 10_000 + n)  # fmt: skip


def free(*ms: Movement) -> list[Candidate]:
    return [Candidate(m, matched=False) for m in ms]


def test_windows_are_epoch_aligned_and_end_exclusive() -> None:
    hour = 3_600_000
    assert window_start(5 * hour, hour) == 5 * hour
    assert window_start(5 * hour - 1, hour) == 4 * hour
    with pytest.raises(ValueError):
        window_start(1, 0)


def test_utc_date() -> None:
    assert utc_date(0) == "1970-01-01"
    assert utc_date(DAY_MS - 1) == "1970-01-01"
    assert utc_date(DAY_MS) == "1970-01-02"


def test_reference_names_the_gateway_reference_or_the_payment() -> None:
    m = mv(1)
    assert match_by_reference(ln(1, "gw-1"), free(m)) == match_by_reference(ln(1, "pay-1"), free(m))
    got = match_by_reference(ln(1, "gw-1"), free(m))
    assert got is not None and got.category is Category.MATCHED and got.movement == m


def test_unknown_or_missing_reference_waits_for_tier_two() -> None:
    assert match_by_reference(ln(1, "gw-9"), free(mv(1))) is None
    assert match_by_reference(ln(1, None), free(mv(1))) is None


def test_amount_and_currency_mismatches_by_reference() -> None:
    got = match_by_reference(ln(1, "gw-1", amount=999), free(mv(1)))
    assert got is not None and got.category is Category.AMOUNT_MISMATCH
    got = match_by_reference(ln(1, "gw-1", currency="USD"), free(mv(1)))
    assert got is not None and got.category is Category.CURRENCY_MISMATCH


def test_a_second_line_for_a_matched_movement_is_a_duplicate() -> None:
    m = mv(1)
    got = match_by_reference(ln(2, "gw-1"), [Candidate(m, matched=True)])
    assert got is not None and got.category is Category.DUPLICATE_IN_BANK
    # ... but a different amount for an already matched movement is not a match of anything
    assert match_by_reference(ln(2, "gw-1", amount=5), [Candidate(m, matched=True)]) is None


def test_capture_and_refund_of_one_payment_by_payment_reference() -> None:
    cap, ref = mv(1, 1000, pay="p"), mv(2, -400, pay="p")
    got = match_by_reference(ln(1, "p", amount=-400), free(cap, ref))
    assert got is not None and got.category is Category.MATCHED and got.movement == ref
    got = match_by_reference(ln(2, "p", amount=-300), free(cap, ref))
    assert got is not None and got.category is Category.AMOUNT_MISMATCH and got.movement == ref


def test_tier_two_pairs_unique_amounts_within_tolerance() -> None:
    a, b = mv(1, 1000), mv(2, 2000, day=1)
    out = match_by_amount([ln(1, None, 2000, day=2), ln(2, None, 1000)], [a, b], tolerance_days=1)
    assert {(line.line_key, m.movement_id) for line, m in out.pairs} == {
        ("st-1/1", "cap-2"), ("st-1/2", "cap-1")}  # fmt: skip
    assert not out.ambiguous
    far = match_by_amount([ln(1, None, 2000, day=5)], [b], tolerance_days=1)
    assert not far.pairs and not far.ambiguous


def test_tier_two_never_guesses() -> None:
    a, b = mv(1, 1000), mv(2, 1000)
    out = match_by_amount([ln(1, None, 1000)], [a, b], tolerance_days=0)
    assert not out.pairs
    assert [(line.line_key, [m.movement_id for m in ms]) for line, ms in out.ambiguous] == [
        ("st-1/1", ["cap-1", "cap-2"])]  # fmt: skip
    # two lines wanting one movement: neither is paired
    out = match_by_amount([ln(1, None, 1000), ln(2, None, 1000)], [a], tolerance_days=0)
    assert not out.pairs and len(out.ambiguous) == 2


def test_tolerance_must_not_be_negative() -> None:
    with pytest.raises(ValueError):
        match_by_amount([], [], tolerance_days=-1)


amounts = st.sampled_from([500, 1000, 1500, -200])


@given(
    st.lists(st.tuples(amounts, st.integers(0, 3)), max_size=12),
    st.lists(st.tuples(amounts, st.integers(0, 3)), max_size=12),
    st.integers(0, 2),
    st.randoms(use_true_random=False),
)
def test_tier_two_is_order_free_and_matches_each_side_at_most_once(
    ms: list[tuple[int, int]], ls: list[tuple[int, int]], tol: int, rnd: random.Random
) -> None:
    movements = [mv(i, a, day=d) for i, (a, d) in enumerate(ms)]
    lines = [ln(i, None, a, day=d) for i, (a, d) in enumerate(ls)]
    out = match_by_amount(lines, movements, tol)
    shuffled_l, shuffled_m = lines[:], movements[:]
    rnd.shuffle(shuffled_l)
    rnd.shuffle(shuffled_m)
    assert match_by_amount(shuffled_l, shuffled_m, tol) == out
    paired_l = [line.line_key for line, _ in out.pairs]
    paired_m = [m.movement_id for _, m in out.pairs]
    assert len(set(paired_l)) == len(paired_l) and len(set(paired_m)) == len(paired_m)
    for line, m in out.pairs:
        assert (line.amount_minor, line.currency) == (m.amount_minor, m.currency)
    assert not set(paired_l) & {line.line_key for line, _ in out.ambiguous}


def test_discrepancy_ids_are_stable_and_distinct() -> None:
    m, line = mv(1), ln(1, "gw-1", amount=5)
    one = discrepancy(Category.AMOUNT_MISMATCH, "m1", "EUR", 0, m, line)
    assert one == discrepancy(Category.AMOUNT_MISMATCH, "m1", "EUR", 0, m, line)
    assert one.internal_minor == 1000 and one.bank_minor == 5 and one.payment_id == "pay-1"
    others = {
        discrepancy(Category.MISSING_IN_BANK, "m1", "EUR", 0, m).discrepancy_id,
        discrepancy(Category.AMOUNT_MISMATCH, "m1", "EUR", 3_600_000, m, line).discrepancy_id,
        discrepancy(Category.AMOUNT_MISMATCH, "m2", "EUR", 0, m, line).discrepancy_id,
        one.discrepancy_id,
    }
    assert len(others) == 4
    with pytest.raises(ValueError):
        discrepancy(Category.MATCHED, "m1", "EUR", 0, m, line)
    with pytest.raises(ValueError):
        discrepancy(Category.MISSING_IN_BANK, "m1", "EUR", 0)


def test_report_ids_differ_per_revision() -> None:
    assert report_id("m", "EUR", 0, 1) != report_id("m", "EUR", 0, 2)
    assert report_id("m", "EUR", 0, 1) == report_id("m", "EUR", 0, 1)


def test_a_revision_names_what_it_found_and_what_it_resolved() -> None:
    missing = discrepancy(Category.MISSING_IN_BANK, "m", "EUR", 0, mv(1))
    extra = discrepancy(Category.MISSING_INTERNAL, "m", "EUR", 0, line=ln(1, None))
    rev = revise([missing.discrepancy_id], [extra])
    assert rev.found == (extra,) and rev.resolved == (missing.discrepancy_id,)
    assert revise([extra.discrepancy_id], [extra]) == revise([extra.discrepancy_id], [extra])
    assert revise([extra.discrepancy_id], [extra]).found == ()
