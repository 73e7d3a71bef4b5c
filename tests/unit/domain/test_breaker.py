"""Circuit breaker: resilience4j's COUNT_BASED semantics, persistence, settings, invariants."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import paysaga.domain.breaker as breaker_module
from paysaga.domain.breaker import (
    DEFAULT_BREAKER,
    Breaker,
    BreakerConfig,
    BreakerState,
    Transition,
)

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
T0 = 1_000_000
S, F = True, False


def feed(b: Breaker, outcomes: list[bool], now: int = T0) -> list[Transition]:
    """Allow and record each outcome at `now`; the transitions that happened."""
    out = []
    for ok in outcomes:
        allowed, t = b.allow(now)
        assert allowed, f"call refused in {b.state}"
        assert t is None
        if (t := b.record(ok, now)) is not None:
            out.append(t)
    return out


def opened(config: BreakerConfig, at: int = T0) -> Breaker:
    """A breaker that opened at `at` (all failures)."""
    b = Breaker(config)
    feed(b, [F] * config.minimum_calls, at)
    assert b.state is OPEN and b.opened_at_ms == at
    return b


def half_open(config: BreakerConfig, opened_at: int = T0) -> Breaker:
    b = opened(config, opened_at)
    assert b.tick(opened_at + config.wait_open_ms) is not None
    assert b.state is HALF_OPEN
    return b


SMALL = BreakerConfig(failure_rate_threshold_pct=50, sliding_window_size=10, minimum_calls=10,
                      wait_open_ms=500, permitted_half_open=3)  # fmt: skip


def test_the_module_is_pure() -> None:
    tree = ast.parse(Path(breaker_module.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names}  # fmt: skip
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom)}  # fmt: skip
    assert imported <= {"__future__", "json", "dataclasses", "enum", "typing"}, imported


# --- CLOSED -------------------------------------------------------------------------------


def test_closed_stays_closed_below_minimum_calls_even_at_100_percent_failures() -> None:
    b = Breaker(SMALL)
    assert feed(b, [F] * 9) == []
    assert b.state is CLOSED
    snap = b.snapshot()
    assert snap["failure_rate_pct"] is None and snap["calls"] == 9 and snap["failures"] == 9
    (t,) = feed(b, [F])
    assert (t.from_state, t.to_state, t.failure_rate_pct, t.calls) == (CLOSED, OPEN, 100, 10)


def test_opens_exactly_at_the_threshold_once_the_minimum_is_reached() -> None:
    below = Breaker(SMALL)
    assert feed(below, [S] * 6 + [F] * 4) == [] and below.state is CLOSED
    assert below.snapshot()["failure_rate_pct"] == 40
    at = Breaker(SMALL)
    assert feed(at, [S] * 5 + [F] * 4) == []
    (t,) = feed(at, [F], T0 + 7)
    assert t == Transition(CLOSED, OPEN, T0 + 7, 50, 10, "failure rate 50% >= 50% over 10 calls")
    assert at.state is OPEN and at.opened_at_ms == T0 + 7
    assert at.snapshot()["calls"] == 0 and at.window_calls == 0  # the window is cleared


def test_every_outcome_after_the_minimum_is_a_decision() -> None:
    cfg = BreakerConfig(failure_rate_threshold_pct=50, sliding_window_size=10, minimum_calls=4)
    b = Breaker(cfg)
    assert feed(b, [S, S, S, S, F, F, F]) == []  # 3/7 = 42 %
    (t,) = feed(b, [F])
    assert (t.failure_rate_pct, t.calls) == (50, 8)


@pytest.mark.parametrize(("threshold", "opens"), [(33, True), (34, False)])
def test_the_rate_is_compared_exactly_not_rounded(threshold: int, opens: bool) -> None:
    """1 in 3 is 33.3 %: over a threshold of 33, under one of 34 (a rounded 33 % or a float
    compare would get one of these wrong for some threshold)."""
    cfg = BreakerConfig(failure_rate_threshold_pct=threshold, sliding_window_size=3,
                        minimum_calls=3)  # fmt: skip
    b = Breaker(cfg)
    feed(b, [F, S, S])
    assert (b.state is OPEN) is opens


def test_the_window_slides_old_failures_fall_out() -> None:
    cfg = BreakerConfig(failure_rate_threshold_pct=75, sliding_window_size=4, minimum_calls=4)
    b = Breaker(cfg)
    assert feed(b, [F, F, S, S]) == []  # 50 %
    assert feed(b, [S, S]) == []  # the two failures slid out
    assert b.snapshot()["calls"] == 4 and b.snapshot()["failures"] == 0
    assert feed(b, [F, F]) == []  # [S, S, F, F]: 50 %, where a cumulative count has 4/8
    (t,) = feed(b, [F])  # [S, F, F, F]: 75 %
    assert (t.failure_rate_pct, t.calls) == (75, 4)


# --- OPEN ---------------------------------------------------------------------------------


def test_open_refuses_until_the_wait_has_elapsed_never_early() -> None:
    b = opened(SMALL)
    assert b.next_change_ms() == T0 + 500
    for now in (T0, T0 + 1, T0 + 499):
        assert b.allow(now) == (False, None)
        assert b.tick(now) is None
        assert b.state is OPEN
    allowed, t = b.allow(T0 + 500)
    assert allowed
    assert t is not None and (t.from_state, t.to_state, t.at_ms) == (OPEN, HALF_OPEN, T0 + 500)
    assert t.failure_rate_pct is None and t.calls == 0
    assert b.state is HALF_OPEN and b.half_open_free() == 2 and b.next_change_ms() is None


def test_tick_moves_open_to_half_open_without_a_call() -> None:
    b = opened(SMALL)
    assert b.half_open_free() == 0
    assert b.tick(T0 + 499) is None
    t = b.tick(T0 + 612)
    assert t is not None and (t.from_state, t.to_state, t.at_ms) == (OPEN, HALF_OPEN, T0 + 612)
    assert b.half_open_free() == 3 and b.snapshot()["opened_at_ms"] == T0
    assert b.tick(T0 + 10_000) is None  # nothing more to do


def test_late_outcomes_while_open_are_ignored() -> None:
    b = opened(SMALL)
    before = b.to_json()
    assert b.record(True, T0 + 1) is None
    assert b.record(False, T0 + 2) is None
    assert b.to_json() == before and b.state is OPEN
    assert b.allow(T0 + 499)[0] is False  # the wait did not move either


# --- HALF_OPEN ----------------------------------------------------------------------------


def test_half_open_permits_exactly_n_calls() -> None:
    for n in (1, 3, 7):
        b = half_open(BreakerConfig(permitted_half_open=n, wait_open_ms=500))
        now = T0 + 500
        frees = []
        for _ in range(n):
            frees.append(b.half_open_free())
            assert b.allow(now) == (True, None)
        assert frees == list(range(n, 0, -1)) and b.half_open_free() == 0
        assert [b.allow(now + k)[0] for k in range(5)] == [False] * 5
        assert b.state is HALF_OPEN


def test_half_open_closes_on_good_outcomes() -> None:
    b = half_open(SMALL)
    now = T0 + 600
    for _ in range(3):
        assert b.allow(now)[0]
    assert b.record(S, now) is None and b.record(F, now) is None  # no decision before all 3
    t = b.record(S, now + 1)
    assert t == Transition(HALF_OPEN, CLOSED, now + 1, 33, 3,
                           "half-open trial: failure rate 33% < 50% over 3 calls")  # fmt: skip
    assert b.state is CLOSED and b.opened_at_ms is None
    assert b.snapshot()["calls"] == 0  # a fresh window: the minimum applies again
    assert feed(b, [F] * 9, now + 2) == [] and b.state is CLOSED


def test_half_open_reopens_on_bad_outcomes_and_the_wait_restarts() -> None:
    b = half_open(SMALL)  # opened at T0, half-open at T0 + 500
    reopen_at = T0 + 650
    for _ in range(3):
        assert b.allow(T0 + 600)[0]
    assert b.record(F, reopen_at) is None and b.record(S, reopen_at) is None
    t = b.record(F, reopen_at)
    assert t is not None and (t.to_state, t.failure_rate_pct, t.calls) == (OPEN, 66, 3)
    assert b.state is OPEN and b.opened_at_ms == reopen_at
    assert b.next_change_ms() == reopen_at + 500
    assert b.allow(T0 + 1000) == (False, None)  # the first opening's wait again: too early
    assert b.allow(reopen_at + 499) == (False, None)
    allowed, t2 = b.allow(reopen_at + 500)
    assert allowed and t2 is not None and t2.to_state is HALF_OPEN


def test_half_open_reopens_at_exactly_the_threshold() -> None:
    b = half_open(BreakerConfig(permitted_half_open=4, wait_open_ms=500))
    for _ in range(4):
        assert b.allow(T0 + 500)[0]
    transitions = [b.record(ok, T0 + 501) for ok in (S, F, S, F)]
    assert transitions[:3] == [None] * 3
    t = transitions[3]
    assert t is not None and (t.to_state, t.failure_rate_pct, t.calls) == (OPEN, 50, 4)
    assert t.reason == "half-open trial: failure rate 50% >= 50% over 4 calls"


def test_an_outcome_with_no_trial_permit_awaiting_it_is_ignored() -> None:
    """An answer to a call allowed while CLOSED can reach a HALF_OPEN breaker; it is not a
    trial call's and must not fill a trial slot."""
    b = half_open(SMALL)
    assert b.record(F, T0 + 501) is None
    assert b.snapshot()["calls"] == 0 and b.half_open_free() == 3
    assert b.allow(T0 + 502)[0]
    assert b.record(S, T0 + 503) is None
    assert b.record(F, T0 + 504) is None  # the one permit has its outcome already
    assert b.snapshot()["calls"] == 1 and b.snapshot()["failures"] == 0


def test_an_unanswered_trial_call_recorded_as_a_timeout_frees_the_decision() -> None:
    b = half_open(SMALL)
    for _ in range(3):
        assert b.allow(T0 + 500)[0]
    b.record(S, T0 + 510)
    b.record(S, T0 + 520)
    assert b.state is HALF_OPEN  # the third answer never comes ...
    t = b.record(False, T0 + 10_500)  # ... its command timeout is a failure: 33 % < 50 %
    assert t is not None and t.to_state is CLOSED


def test_snapshot() -> None:
    b = Breaker(SMALL)
    feed(b, [F, S] * 4)
    assert b.snapshot() == {"state": "closed", "failure_rate_pct": None, "calls": 8,
                            "failures": 4, "opened_at_ms": None,
                            "half_open_permits_free": 0}  # fmt: skip
    assert opened(SMALL).snapshot() == {"state": "open", "failure_rate_pct": None, "calls": 0,
                                        "failures": 0, "opened_at_ms": T0,
                                        "half_open_permits_free": 0}  # fmt: skip
    b = Breaker(SMALL)
    feed(b, [S, F, F, S, S, S, F, S, S, S])
    assert b.snapshot() == {"state": "closed", "failure_rate_pct": 30, "calls": 10,
                            "failures": 3, "opened_at_ms": None,
                            "half_open_permits_free": 0}  # fmt: skip
    b = half_open(SMALL)
    b.allow(T0 + 500)
    b.record(F, T0 + 501)
    assert b.snapshot() == {"state": "half_open", "failure_rate_pct": None, "calls": 1,
                            "failures": 1, "opened_at_ms": T0,
                            "half_open_permits_free": 2}  # fmt: skip


# --- persistence --------------------------------------------------------------------------


def configs_up_to(window: int) -> st.SearchStrategy[BreakerConfig]:
    return st.builds(
        lambda threshold, size, min_frac, wait, permits: BreakerConfig(
            threshold, size, max(1, size * min_frac // 100), wait, permits),
        st.integers(1, 100), st.integers(1, window), st.integers(0, 100), st.integers(1, 2_000),
        st.integers(1, 6),
    )  # fmt: skip


configs = configs_up_to(30)
#: Small windows reach every state within a short sequence of operations.
small_configs = configs_up_to(8)
#: ("allow" | "tick" | "ok" | "fail", milliseconds since the previous operation).
ops = st.lists(st.tuples(st.sampled_from(["allow", "allow", "tick", "ok", "fail", "fail"]),
                         st.integers(0, 700)), max_size=120)  # fmt: skip
Ops = list[tuple[str, int]]


def run(b: Breaker, sequence: Ops, now: int) -> tuple[list[object], int]:
    """Apply the operations; everything the breaker answered, and the clock at the end."""
    answers: list[object] = []
    for op, dt in sequence:
        now += dt
        if op == "allow":
            answers.append(b.allow(now))
        elif op == "tick":
            answers.append(b.tick(now))
        else:
            answers.append(b.record(op == "ok", now))
        answers.append((b.half_open_free(), b.next_change_ms(), b.snapshot()))
    return answers, now


@settings(max_examples=300, deadline=None)
@given(config=small_configs, prefix=ops, continuation=ops)
def test_a_restored_breaker_behaves_identically(
    config: BreakerConfig, prefix: Ops, continuation: Ops
) -> None:
    original = Breaker(config)
    _, now = run(original, prefix, T0)
    event(f"stored in {original.state}")
    raw = original.to_json()
    restored = Breaker.from_json(raw, config)
    assert restored == original
    assert restored.to_json() == raw  # deterministic
    assert json.loads(raw)  # and plain JSON
    assert run(restored, continuation, now) == run(original, continuation, now)


def test_stored_json_is_compact() -> None:
    b = Breaker(SMALL)
    assert b.to_json() == b'{"s":"closed","w":""}'
    feed(b, [S, F, S])
    assert b.to_json() == b'{"s":"closed","w":"010"}'
    b = half_open(SMALL)
    b.allow(T0 + 500)
    assert b.to_json() == b'{"f":0,"h":1000500,"i":1,"n":0,"o":1000000,"s":"half_open"}'


def test_a_longer_window_is_trimmed_to_the_new_size_keeping_the_latest() -> None:
    b = Breaker(BreakerConfig(sliding_window_size=20, minimum_calls=20))
    feed(b, [F] * 10 + [S] * 5)
    assert b.state is CLOSED
    small = BreakerConfig(sliding_window_size=5, minimum_calls=5)
    r = Breaker.from_json(b.to_json(), small)
    assert (r.window_calls, r.window_failures) == (5, 0)
    assert feed(r, [F, F]) == []  # [S, S, S, F, F]: 40 %
    (t,) = feed(r, [F])
    assert t.calls == 5 and t.failure_rate_pct == 60
    bigger = Breaker.from_json(b.to_json(), BreakerConfig(sliding_window_size=50))
    assert (bigger.window_calls, bigger.window_failures) == (15, 10)


def test_a_closed_window_over_a_new_threshold_opens_on_its_next_outcome() -> None:
    b = Breaker(BreakerConfig(failure_rate_threshold_pct=80, sliding_window_size=10))
    feed(b, [F, F, F, S] * 2 + [F, S])  # 60 %
    r = Breaker.from_json(b.to_json(), BreakerConfig(failure_rate_threshold_pct=50,
                                                     sliding_window_size=10))  # fmt: skip
    assert r.state is CLOSED
    t = r.record(True, T0)
    assert t is not None and t.to_state is OPEN


def test_an_open_breaker_waits_the_new_wait_from_when_it_opened() -> None:
    b = opened(SMALL)
    r = Breaker.from_json(b.to_json(), BreakerConfig(wait_open_ms=2_000))
    assert r.next_change_ms() == T0 + 2_000
    assert r.allow(T0 + 1_999) == (False, None)
    assert r.allow(T0 + 2_000)[0]


def test_a_half_open_trial_survives_a_config_change_it_fits_and_restarts_otherwise() -> None:
    b = half_open(BreakerConfig(permitted_half_open=5, wait_open_ms=500))
    for _ in range(3):
        b.allow(T0 + 500)
    b.record(S, T0 + 501)
    b.record(S, T0 + 502)
    raw = b.to_json()
    fits = Breaker.from_json(raw, BreakerConfig(permitted_half_open=4))
    assert (fits.half_open_issued, fits.half_open_calls, fits.half_open_free()) == (3, 2, 1)
    # 3 permits issued, 2 outcomes in: a trial of 2 cannot use them, so it starts over
    for permits in (1, 2):
        shrunk = Breaker.from_json(raw, BreakerConfig(permitted_half_open=permits))
        assert shrunk.state is HALF_OPEN and shrunk.half_open_free() == permits
        assert shrunk.snapshot()["calls"] == 0
        assert shrunk.record(F, T0 + 503) is None  # an answer to the old trial: ignored
        for _ in range(permits):
            assert shrunk.allow(T0 + 504)[0]
        outcomes = [shrunk.record(S, T0 + 505) for _ in range(permits)]
        assert outcomes[-1] is not None and outcomes[-1].to_state is CLOSED


@pytest.mark.parametrize("raw", [
    b"", b"{", b"[]", b'{"s":"shut"}', b'{"s":"closed"}', b'{"s":"closed","w":"012"}',
    b'{"s":"open"}', b'{"s":"open","o":null}', b'{"s":"half_open","o":1,"i":1,"n":2,"f":0}',
    b'{"s":"half_open","o":1,"i":2,"n":1,"f":2}',
])  # fmt: skip
def test_a_corrupt_stored_breaker_is_refused(raw: bytes) -> None:
    with pytest.raises(ValueError, match="stored breaker"):
        Breaker.from_json(raw, SMALL)


# --- settings -----------------------------------------------------------------------------


@given(configs)
def test_parse_is_the_inverse_of_spec(config: BreakerConfig) -> None:
    assert BreakerConfig.parse(config.spec()) == config


def test_parse_takes_any_subset_of_keys() -> None:
    assert BreakerConfig.parse("") == BreakerConfig() == BreakerConfig.parse(DEFAULT_BREAKER)
    assert DEFAULT_BREAKER == ("threshold=50,window=20,min=10,wait_ms=30000,half_open=3,"
                               "half_open_max_ms=0")  # fmt: skip
    assert BreakerConfig.parse(" wait_ms = 5000 , threshold=80 ") == BreakerConfig(
        failure_rate_threshold_pct=80, wait_open_ms=5_000)  # fmt: skip
    assert BreakerConfig.parse("window=5,min=5").spec() == (
        "threshold=50,window=5,min=5,wait_ms=30000,half_open=3,half_open_max_ms=0")  # fmt: skip


@pytest.mark.parametrize(("spec", "match"), [
    ("thresh=50", "unknown key 'thresh'.*known: threshold, window, min, wait_ms, half_open"),
    ("threshold=50,windw=3", "unknown key 'windw'"),
    ("threshold", "'threshold' is not KEY=VALUE"),
    ("threshold=high", "threshold must be an integer, got 'high'"),
    ("window=2.5", "window must be an integer"),
    ("min=3,min=4", "'min' given twice"),
    ("threshold=0", "threshold must be 1..100 %, got 0"),
    ("threshold=101", "1..100 %, got 101"),
    ("window=0,min=1", "window must hold >= 1 call, got 0"),
    ("window=5", "minimum calls must be 1..5 .*got 10"),
    ("min=0", "minimum calls must be 1..20"),
    ("wait_ms=0", "wait in open must be >= 1 ms, got 0"),
    ("half_open=0", "half-open permits must be >= 1, got 0"),
])  # fmt: skip
def test_parse_refuses_nonsense_clearly(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BreakerConfig.parse(spec)


# --- invariants ---------------------------------------------------------------------------


#: The transitions a breaker can make.
EDGES = {(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (HALF_OPEN, CLOSED)}


@dataclass
class Model:
    """What a caller can know from the returned transitions alone."""

    state: BreakerState = CLOSED
    opened_at: int | None = None
    permits: int = 0
    outstanding: list[int] = field(default_factory=list)

    def saw(self, t: Transition | None, now: int) -> None:
        if t is None:
            return
        assert (t.from_state, t.to_state) in EDGES and t.from_state is self.state
        assert t.at_ms == now
        self.state = t.to_state
        if t.to_state is OPEN:
            self.opened_at = now
        if t.to_state is HALF_OPEN:
            self.permits = 0
            assert t.failure_rate_pct is None
        else:
            assert t.failure_rate_pct is not None and t.calls >= 1


class BreakerMachine(RuleBasedStateMachine):
    """Random allows, outcomes (of allowed calls, in any order, or timeouts), ticks and
    restarts from storage: OPEN never lets a call out before its wait, HALF_OPEN never more
    than its permits, and every change of state is one the caller was told about."""

    @initialize(config=small_configs)
    def start(self, config: BreakerConfig) -> None:
        self.config = config
        self.breaker = Breaker(config)
        self.model = Model()
        self.now = T0

    @rule(dt=st.integers(0, 1_500))
    def allow(self, dt: int) -> None:
        self.now += dt
        m = self.model
        was_open_early = (m.state is OPEN and m.opened_at is not None
                          and self.now < m.opened_at + self.config.wait_open_ms)  # fmt: skip
        allowed, t = self.breaker.allow(self.now)
        if was_open_early:
            assert not allowed and t is None
        self.model.saw(t, self.now)
        if allowed:
            assert self.model.state is not OPEN
            self.model.outstanding.append(self.now)
            if self.model.state is HALF_OPEN:
                self.model.permits += 1

    @rule(data=st.data(), ok=st.booleans(), dt=st.integers(0, 1_500))
    def answer(self, data: st.DataObject, ok: bool, dt: int) -> None:
        if not self.model.outstanding:
            return
        i = data.draw(st.integers(0, len(self.model.outstanding) - 1), label="which call")
        self.model.outstanding.pop(i)
        self.now += dt
        before = self.breaker.to_json()
        t = self.breaker.record(ok, self.now)
        if self.model.state is OPEN:
            assert t is None and self.breaker.to_json() == before
        self.model.saw(t, self.now)

    @rule(dt=st.integers(0, 1_500))
    def tick(self, dt: int) -> None:
        self.now += dt
        due = self.breaker.next_change_ms()
        t = self.breaker.tick(self.now)
        assert (t is not None) == (due is not None and self.now >= due)
        self.model.saw(t, self.now)

    @rule()
    def restart(self) -> None:
        self.breaker = Breaker.from_json(self.breaker.to_json(), self.config)

    @invariant()
    def agrees_with_what_the_caller_was_told(self) -> None:
        if not hasattr(self, "breaker"):
            return
        b, m = self.breaker, self.model
        assert b.state is m.state
        assert m.permits <= self.config.permitted_half_open
        if b.state is HALF_OPEN:
            assert b.half_open_free() == self.config.permitted_half_open - m.permits
        else:
            assert b.half_open_free() == 0
        if b.state is OPEN:
            assert m.opened_at is not None
            assert b.next_change_ms() == m.opened_at + self.config.wait_open_ms
        else:
            assert b.next_change_ms() is None
        snap = b.snapshot()
        assert snap["state"] == str(b.state) and snap["half_open_permits_free"] == (
            b.half_open_free())  # fmt: skip


BreakerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=60,
                                            deadline=None)  # fmt: skip
test_breaker_invariants = BreakerMachine.TestCase


# --- the half-open trial's max wait (the safety net) --------------------------------------


def test_a_trial_undecided_within_its_max_wait_opens_again() -> None:
    cfg = BreakerConfig(wait_open_ms=500, permitted_half_open=2, max_half_open_ms=1_000)
    b = half_open(cfg)  # half open at T0 + 500
    assert b.allow(T0 + 600) == (True, None)
    assert b.record(True, T0 + 700) is None  # one outcome of two
    assert b.next_change_ms() == T0 + 1_500
    assert b.tick(T0 + 1_499) is None and b.state is HALF_OPEN
    t = b.tick(T0 + 1_500)
    assert t is not None and (t.from_state, t.to_state, t.calls) == (HALF_OPEN, OPEN, 1)
    assert "undecided" in t.reason and t.failure_rate_pct is None
    assert b.opened_at_ms == T0 + 1_500 and b.next_change_ms() == T0 + 2_000
    assert b.record(True, T0 + 1_600) is None and b.state is OPEN  # the late one: ignored


def test_the_trial_start_survives_a_restart() -> None:
    cfg = BreakerConfig(wait_open_ms=500, max_half_open_ms=1_000)
    b = opened(cfg)
    b.tick(T0 + 800)  # half open late (a worker was down): the max wait runs from here
    r = Breaker.from_json(b.to_json(), cfg)
    assert r == b and r.next_change_ms() == T0 + 1_800
    old = b'{"f":0,"i":0,"n":0,"o":%d,"s":"half_open"}' % T0  # stored before the field
    assert Breaker.from_json(old, cfg).next_change_ms() == T0 + 500 + 1_000
    assert BreakerConfig.parse("half_open_max_ms=5", cfg).max_half_open_ms == 5
    assert BreakerConfig.parse("min=2", cfg).max_half_open_ms == 1_000  # the base's
    with pytest.raises(ValueError, match="half-open max wait"):
        BreakerConfig(max_half_open_ms=-1)
