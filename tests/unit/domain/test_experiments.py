"""The retry experiment's statistics: sums that merge, and intervals checked against the
published examples (Newcombe 1998, Statistics in Medicine 17:857 and 17:873)."""

from __future__ import annotations

import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from paysaga.domain.experiments import VariantStats, compare, sample_size_per_arm, wilson_interval
from paysaga.streams.ops.experiments_view import render_report
from paysaga.tables.experiments import merge_partitions


def test_wilson_interval_matches_newcombes_example() -> None:
    lo, hi = wilson_interval(81, 263)
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(10, 10)  # at 100 % the interval still has width
    assert hi == 1.0 and 0.6 < lo < 0.8


def test_difference_interval_matches_newcombes_method_10() -> None:
    c = compare(VariantStats(80, 48), VariantStats(70, 56))
    assert c is not None
    assert round(c.difference, 4) == 0.2
    assert (round(c.low, 4), round(c.high, 4)) == (0.0524, 0.3339)
    assert c.significant
    assert compare(VariantStats(), VariantStats(5, 5)) is None


def test_a_small_difference_is_not_significant_and_says_how_many_would_tell() -> None:
    c = compare(VariantStats(1000, 950), VariantStats(1000, 960))
    assert c is not None and not c.significant and c.low < 0 < c.high
    assert c.needed_per_arm is not None and c.needed_per_arm > 1000
    assert sample_size_per_arm(0.9, 0.9) is None
    # Larger differences need fewer sagas.
    assert sample_size_per_arm(0.9, 0.8) < sample_size_per_arm(0.9, 0.85)  # type: ignore[operator]


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 9), st.integers(-5, 10**6)), max_size=50),
       st.integers(0, 50))  # fmt: skip
def test_merging_partitions_equals_counting_in_one(sagas: list[tuple[bool, int, int]],
                                                   cut: int) -> None:  # fmt: skip
    one, a, b = VariantStats(), VariantStats(), VariantStats()
    for i, (ok, retries, ms) in enumerate(sagas):
        one.add(ok, retries, ms)
        (a if i < cut else b).add(ok, retries, ms)
    assert a.merged(b) == one
    assert VariantStats.from_dict(one.to_dict()) == one
    assert one.outcome_ms >= 0 and one.successes <= one.sagas


def test_merge_partitions_sums_each_variant_over_partitions() -> None:
    import json

    def raw(s: VariantStats) -> bytes:
        return json.dumps(s.to_dict()).encode()

    got = merge_partitions({(0, b"CONTROL"): raw(VariantStats(3, 2, 1, 30)),
                            (1, b"CONTROL"): raw(VariantStats(1, 1, 0, 10)),
                            (1, b"TEST_A"): raw(VariantStats(2, 2, 4, 5))})  # fmt: skip
    assert got == {"CONTROL": VariantStats(4, 3, 1, 40), "TEST_A": VariantStats(2, 2, 4, 5)}


def test_report_shows_rates_intervals_and_significance() -> None:
    out = io.StringIO()
    stats = {"CONTROL": VariantStats(1000, 950, 300, 2_000_000),
             "TEST_A": VariantStats(500, 490, 100, 900_000),
             "TEST_B": VariantStats(500, 477, 200, 1_500_000)}  # fmt: skip
    assert render_report(stats, "CONTROL", out) == 0
    text = out.getvalue()
    assert "2000 ended sagas" in text
    assert "95.00%" in text and "98.00%" in text  # CONTROL's and TEST_A's success rates
    assert "+3.00 pp" in text and "yes" in text  # TEST_A is better, significantly
    assert "TEST_B: not significant at 500 vs 1000" in text
    assert "0.300" in text  # CONTROL's average retry count
    empty = io.StringIO()
    render_report({}, "CONTROL", empty)
    assert "no sample" in empty.getvalue()


@pytest.mark.parametrize("control", ["CONTROL", "MISSING"])
def test_report_without_a_control_sample_compares_nothing(control: str) -> None:
    out = io.StringIO()
    render_report({"TEST_A": VariantStats(10, 9)}, control, out)
    assert "nothing to compare against" in out.getvalue()


def test_sagas_still_running_are_shown_and_warned_about() -> None:
    """The sample is ended sagas; a started one not ended yet is outside it (censored)."""
    s = VariantStats()
    for _ in range(5):
        s.start()
    s.add(True, 0, 10)
    assert (s.started, s.running) == (5, 4)
    assert VariantStats.from_dict({"n": 1, "ok": 1, "r": 0, "ms": 10}).started == 0  # older
    assert VariantStats.from_dict(s.to_dict()) == s
    s.remove(True, 0, 10)  # an IN_DOUBT end taken back: running again
    assert s.running == 5
    out = io.StringIO()
    render_report({"CONTROL": VariantStats(100, 90, 0, 10, started=130),
                   "TEST_A": VariantStats(50, 49, 0, 5, started=50)}, "CONTROL", out)  # fmt: skip
    text = out.getvalue()
    assert "30 sagas have started and not ended" in text and "censoring" in text
    calm = io.StringIO()
    render_report({"CONTROL": VariantStats(100, 90, 0, 10, started=100)}, "CONTROL", calm)
    assert "not ended" not in calm.getvalue()
