"""Retry policy: levels, variants by a stable hash, parsing from settings."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from paysaga.domain.retry import (
    DEFAULT_ATTEMPTS,
    DEFAULT_VARIANTS,
    ErrorClass,
    RetryPolicy,
    Variant,
    classify,
)

POLICY = RetryPolicy()


def test_levels_follow_seed_000() -> None:
    assert [POLICY.level_of(n) for n in range(1, 11)] == [1, 1, 2, 2, 3, 3, 4, 4, 4, None]
    assert POLICY.max_retries == 9 and POLICY.levels == 4
    assert [POLICY.delay_ms("CONTROL", lvl) for lvl in (1, 2, 3, 4)] == [1000, 5000, 30000, 300000]
    assert [POLICY.delay_ms("TEST_A", lvl) for lvl in (1, 2, 3, 4)] == [500, 2000, 10000, 60000]
    assert [POLICY.delay_ms("TEST_B", lvl) for lvl in (1, 2, 3, 4)] == [2000, 10000, 60000, 600000]


def test_an_unknown_or_missing_variant_retries_as_the_control() -> None:
    assert POLICY.variant(None).name == POLICY.variant("GONE").name == "CONTROL"


def test_error_classes() -> None:
    assert classify(True) is ErrorClass.TRANSIENT and classify(False) is ErrorClass.PERMANENT


def test_split_over_10000_customers_is_within_tolerance() -> None:
    split = Counter(POLICY.variant_for(f"cus_{n}").name for n in range(10_000))
    # binomial sd at n=10,000: 50 % -> 50, 25 % -> 43; 4 sd of tolerance
    assert abs(split["CONTROL"] - 5000) < 200
    assert abs(split["TEST_A"] - 2500) < 175 and abs(split["TEST_B"] - 2500) < 175


def test_assignment_is_the_same_in_another_process() -> None:
    """Python's str hash is salted per process (seed 000's `hash()` would move customers
    between variants); the assignment must not be."""
    ids = [f"cus_{n}" for n in range(200)]
    here = [POLICY.variant_for(c).name for c in ids]
    code = ("from paysaga.domain.retry import RetryPolicy; p = RetryPolicy(); "
            f"print(','.join(p.variant_for(c).name for c in {ids!r}))")  # fmt: skip
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, env={"PYTHONHASHSEED": seed})  # fmt: skip
        assert out.stdout.strip().split(",") == here


@given(st.text(min_size=1, max_size=40))
def test_assignment_is_a_function_of_the_customer(customer: str) -> None:
    assert POLICY.variant_for(customer) == RetryPolicy().variant_for(customer)


def test_zero_weight_gets_nobody() -> None:
    policy = RetryPolicy((1,), (Variant("A", 1, (10,)), Variant("B", 0, (20,))))
    assert {policy.variant_for(f"c{n}").name for n in range(500)} == {"A"}


def test_parse_round_trips_and_refuses_nonsense() -> None:
    assert RetryPolicy.parse(DEFAULT_ATTEMPTS, DEFAULT_VARIANTS) == POLICY
    assert RetryPolicy.parse("1,1", "X:1:5,10").spec() == ("1,1", "X:1:5,10")
    for attempts, variants, match in (
        ("2,x", DEFAULT_VARIANTS, "comma-separated"),
        ("2,2", "A:1:5", "1 delays for 2 levels"),
        ("0", "A:1:5", ">= 1"),
        ("1", "A:1", "NAME:WEIGHT"),
        ("1", "A:0:5", "more than 0"),
        ("1", "A:1:5;A:1:6", "repeat"),
        ("1", "A:1:-5", ">= 0 ms"),
    ):
        with pytest.raises(ValueError, match=match):
            RetryPolicy.parse(attempts, variants)
