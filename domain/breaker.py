"""A circuit breaker for a downstream service: stop calling it while it is failing.

Pure domain code (no Faust, no Kafka, no clock of its own): the saga agent asks it before a
command goes out to a service and tells it the outcome; while the service fails, payments are
held instead of piling retries onto it, and a few trial calls find out when it has recovered.
Time is an argument (the engine's wall clock, milliseconds), so the breaker is a value: the
agent stores it (`to_json`) in the same transaction as the commands it allowed, and a replay
or a restarted worker sees exactly the same decisions.

The semantics are resilience4j's COUNT_BASED circuit breaker:

- **CLOSED**: every call goes out; each outcome enters a sliding window of the last
  `sliding_window_size` calls. Nothing is decided before `minimum_calls` outcomes are in the
  window; from then on a failure rate >= `failure_rate_threshold_pct` opens the breaker (and
  clears the window).
- **OPEN**: no call goes out until `wait_open_ms` has passed since opening (at
  ``opened_at + wait`` exactly, never a millisecond early); then it is HALF_OPEN, either on the
  next `allow` or on a `tick` (the timer that releases held payments with no new call).
- **HALF_OPEN**: `permitted_half_open` trial calls go out, no more. Once all their outcomes
  are in, a failure rate >= the threshold opens it again (the wait restarts), anything lower
  closes it with an empty window.

Rates are compared exactly: the integer percent is the floor of ``100 * failures / calls``,
and for an integer threshold ``floor(rate) >= threshold`` holds exactly when the true rate
does, so no float rounding decides a transition.

Every allowed call must have exactly one outcome recorded. A trial call that is never
answered would hold its HALF_OPEN permit forever, so the caller records its command timeout
as a failure (a lost answer is a failure of the service, like a 503): no separate
permit-expiry mechanism is needed. An answer that arrives after its timeout was recorded must
not be recorded again. Outcomes that cannot belong to a permitted call are ignored: one that
arrives while OPEN (the call was allowed before the breaker opened; resilience4j counts it
in metrics that are discarded anyway), and one that arrives in HALF_OPEN when every trial
permit already has its outcome.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


#: The keys of a breaker spec (settings) and the config fields they set, in spec order.
_SPEC_KEYS: dict[str, str] = {
    "threshold": "failure_rate_threshold_pct",
    "window": "sliding_window_size",
    "min": "minimum_calls",
    "wait_ms": "wait_open_ms",
    "half_open": "permitted_half_open",
    "half_open_max_ms": "max_half_open_ms",
}


@dataclass(frozen=True)
class BreakerConfig:
    """When the breaker opens, how long it stays open, and how many trial calls it lets out."""

    #: Open when the failure rate (integer percent) is >= this.
    failure_rate_threshold_pct: int = 50
    #: The last N recorded calls (count based).
    sliding_window_size: int = 20
    #: No decision before this many calls are in the window.
    minimum_calls: int = 10
    #: Time in OPEN before HALF_OPEN.
    wait_open_ms: int = 30_000
    #: Trial calls let out in HALF_OPEN.
    permitted_half_open: int = 3
    #: A trial still undecided after this long opens the breaker again (resilience4j's
    #: maxWaitDurationInHalfOpenState; 0, its default, waits for the trial's outcomes
    #: forever). A safety net: a trial call whose outcome is never recorded would otherwise
    #: hold its permit, and every held call, for good.
    max_half_open_ms: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.failure_rate_threshold_pct <= 100:
            raise ValueError("breaker failure rate threshold must be 1..100 %, got "
                             f"{self.failure_rate_threshold_pct}")  # fmt: skip
        if self.sliding_window_size < 1:
            raise ValueError(f"breaker sliding window must hold >= 1 call, got "
                             f"{self.sliding_window_size}")  # fmt: skip
        if not 1 <= self.minimum_calls <= self.sliding_window_size:
            raise ValueError(f"breaker minimum calls must be 1..{self.sliding_window_size} (the "
                             f"window size), got {self.minimum_calls}")  # fmt: skip
        if self.wait_open_ms < 1:
            raise ValueError(f"breaker wait in open must be >= 1 ms, got {self.wait_open_ms}")
        if self.max_half_open_ms < 0:
            raise ValueError(f"breaker half-open max wait must be >= 0 ms (0: none), got "
                             f"{self.max_half_open_ms}")  # fmt: skip
        if self.permitted_half_open < 1:
            raise ValueError(f"breaker half-open permits must be >= 1, got "
                             f"{self.permitted_half_open}")  # fmt: skip

    @classmethod
    def parse(cls, spec: str, base: BreakerConfig | None = None) -> BreakerConfig:
        """From settings: ``"threshold=50,window=20,min=10,wait_ms=30000,half_open=3"``, any
        subset of the keys (the rest are `base`'s, the default config's without one; an
        empty spec is `base`)."""
        values: dict[str, int] = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            key, sep, value = (part.strip() for part in item.partition("="))
            if not sep:
                raise ValueError(f"breaker spec {spec!r}: {item!r} is not KEY=VALUE")
            if key not in _SPEC_KEYS:
                raise ValueError(f"breaker spec {spec!r}: unknown key {key!r} (known: "
                                 f"{', '.join(_SPEC_KEYS)})")  # fmt: skip
            if _SPEC_KEYS[key] in values:
                raise ValueError(f"breaker spec {spec!r}: key {key!r} given twice")
            try:
                values[_SPEC_KEYS[key]] = int(value)
            except ValueError as exc:
                raise ValueError(f"breaker spec {spec!r}: {key} must be an integer, "
                                 f"got {value!r}") from exc  # fmt: skip
        return replace(base, **values) if base is not None else cls(**values)

    def spec(self) -> str:
        """The inverse of `parse`, every key in a fixed order (settings defaults)."""
        return ",".join(f"{key}={getattr(self, name)}" for key, name in _SPEC_KEYS.items())


DEFAULT_BREAKER = BreakerConfig().spec()


@dataclass(frozen=True)
class Transition:
    """A change of state, what decided it, and why (for logs, metrics and the status record)."""

    from_state: BreakerState
    to_state: BreakerState
    at_ms: int
    #: The failure rate that decided it; None for the timed OPEN -> HALF_OPEN.
    failure_rate_pct: int | None
    #: Calls in the window (or the half-open trial) that decided it; 0 for the timed one.
    calls: int
    reason: str


def _rate_pct(failures: int, calls: int) -> int:
    """The floor of the failure rate in percent (exact against an integer threshold)."""
    return failures * 100 // calls


@dataclass
class Breaker:
    """One service's breaker. Fields other than `config` are its state; each is only
    meaningful in some states and holds its default in the others (so equal breakers
    behave identically)."""

    config: BreakerConfig
    state: BreakerState = BreakerState.CLOSED
    #: CLOSED: the window's outcomes as bits, bit 0 the most recent, 1 a failure.
    window: int = 0
    #: CLOSED: how many outcomes the window holds (<= sliding_window_size).
    window_calls: int = 0
    #: OPEN and HALF_OPEN: when the breaker (last) opened.
    opened_at_ms: int | None = None
    #: HALF_OPEN: trial permits issued, and the outcomes recorded so far.
    half_open_issued: int = 0
    half_open_calls: int = 0
    half_open_failures: int = 0
    #: HALF_OPEN: when the trial began (its max wait runs from then).
    half_open_at_ms: int | None = None

    @property
    def window_failures(self) -> int:
        return self.window.bit_count()

    def copy(self) -> Breaker:
        """An independent copy (every field is immutable), cheaper than `copy.copy`."""
        return Breaker(self.config, self.state, self.window, self.window_calls,
                       self.opened_at_ms, self.half_open_issued, self.half_open_calls,
                       self.half_open_failures, self.half_open_at_ms)  # fmt: skip

    def allow(self, now_ms: int) -> tuple[bool, Transition | None]:
        """May a call go out now? CLOSED: yes. OPEN: no, unless `wait_open_ms` has elapsed
        since opening (``now >= opened_at + wait``), which moves it to HALF_OPEN (the returned
        transition) and then applies HALF_OPEN's rule. HALF_OPEN: yes while fewer than
        `permitted_half_open` permits were issued (a yes issues one), else no."""
        transition = self.tick(now_ms)
        if self.state is BreakerState.CLOSED:
            return True, transition
        if self.state is BreakerState.HALF_OPEN and self.half_open_free() > 0:
            self.half_open_issued += 1
            return True, transition
        return False, transition

    def record(self, success: bool, now_ms: int) -> Transition | None:
        """The outcome of a call that was allowed (a timeout is a failure). CLOSED: into the
        window; once >= `minimum_calls` are in it and the failure rate is >= the threshold,
        OPEN (window cleared). HALF_OPEN: counted; once `permitted_half_open` outcomes are in,
        a rate >= the threshold re-opens it (the wait restarts), else CLOSED (empty window).
        An outcome while OPEN, or in HALF_OPEN with no permit awaiting one, is ignored."""
        failed = not success
        if self.state is BreakerState.CLOSED:
            size = self.config.sliding_window_size
            self.window = ((self.window << 1) | failed) & ((1 << size) - 1)
            self.window_calls = min(self.window_calls + 1, size)
            calls, failures = self.window_calls, self.window_failures
            if calls < self.config.minimum_calls:
                return None
            rate = _rate_pct(failures, calls)
            if rate < self.config.failure_rate_threshold_pct:
                return None
            reason = f"failure rate {rate}% >= {self.config.failure_rate_threshold_pct}% over "
            return self._open(now_ms, rate, calls, f"{reason}{calls} calls")
        if self.state is BreakerState.HALF_OPEN and self.half_open_calls < self.half_open_issued:
            self.half_open_calls += 1
            self.half_open_failures += failed
            calls = self.half_open_calls
            if calls < self.config.permitted_half_open:
                return None
            rate = _rate_pct(self.half_open_failures, calls)
            threshold = self.config.failure_rate_threshold_pct
            if rate >= threshold:
                reason = f"half-open trial: failure rate {rate}% >= {threshold}% over {calls} calls"
                return self._open(now_ms, rate, calls, reason)
            reason = f"half-open trial: failure rate {rate}% < {threshold}% over {calls} calls"
            return self._move(BreakerState.CLOSED, now_ms, rate, calls, reason)
        return None

    def tick(self, now_ms: int) -> Transition | None:
        """The timer: OPEN -> HALF_OPEN once the wait has elapsed, so held work can be
        released (`half_open_free` of it) even when no new call asks."""
        due = self.next_change_ms()
        if due is None or now_ms < due:
            return None
        assert self.opened_at_ms is not None  # next_change_ms is set in OPEN and HALF_OPEN
        if self.state is BreakerState.HALF_OPEN:  # the trial's max wait is over
            assert self.half_open_at_ms is not None
            reason = (f"half-open trial undecided after {now_ms - self.half_open_at_ms} ms "
                      f"(max {self.config.max_half_open_ms} ms): {self.half_open_calls} of "
                      f"{self.config.permitted_half_open} outcomes")  # fmt: skip
            return self._move(BreakerState.OPEN, now_ms, None, self.half_open_calls, reason,
                              opened_at_ms=now_ms)  # fmt: skip
        waited = now_ms - self.opened_at_ms
        reason = (f"open for {waited} ms (wait {self.config.wait_open_ms} ms): "
                  f"{self.config.permitted_half_open} trial calls")  # fmt: skip
        moved = self._move(BreakerState.HALF_OPEN, now_ms, None, 0, reason, self.opened_at_ms)
        self.half_open_at_ms = now_ms
        return moved

    def next_change_ms(self) -> int | None:
        """When `tick` would next change the state: OPEN's ``opened_at + wait``; HALF_OPEN's
        ``half_open_at + max wait`` when there is a max wait; else None."""
        if self.state is BreakerState.HALF_OPEN:
            limit = self.config.max_half_open_ms
            if limit and self.half_open_at_ms is not None:
                return self.half_open_at_ms + limit
            return None
        if self.state is not BreakerState.OPEN or self.opened_at_ms is None:
            return None
        return self.opened_at_ms + self.config.wait_open_ms

    def half_open_free(self) -> int:
        """Trial permits still free in HALF_OPEN (0 in the other states): how many held
        payments the agent may release now."""
        if self.state is not BreakerState.HALF_OPEN:
            return 0
        return max(0, self.config.permitted_half_open - self.half_open_issued)

    def snapshot(self) -> dict[str, object]:
        """For readiness and metrics. `calls` and `failures` are the window's in CLOSED and
        the trial's in HALF_OPEN; the rate is None until it could decide (`minimum_calls` in
        CLOSED, all the trial's outcomes in HALF_OPEN, which decides at once: so None)."""
        rate: int | None = None
        if self.state is BreakerState.CLOSED:
            calls, failures = self.window_calls, self.window_failures
            if calls >= self.config.minimum_calls:
                rate = _rate_pct(failures, calls)
        else:
            calls, failures = self.half_open_calls, self.half_open_failures
        return {
            "state": str(self.state),
            "failure_rate_pct": rate,
            "calls": calls,
            "failures": failures,
            "opened_at_ms": self.opened_at_ms,
            "half_open_permits_free": self.half_open_free(),
        }

    def to_json(self) -> bytes:
        """The stored state: compact, deterministic JSON of the current state's fields only
        (the window oldest first, ``1`` a failure). The config is not stored: it comes from
        settings, and `from_json` fits the state to whatever config is current."""
        if self.state is BreakerState.CLOSED:  # every gateway answer: the same JSON, cheaper
            bits = format(self.window, f"0{self.window_calls}b") if self.window_calls else ""
            return b'{"s":"closed","w":"%s"}' % bits.encode()
        value: dict[str, Any] = {"s": str(self.state), "o": self.opened_at_ms}
        if self.state is BreakerState.HALF_OPEN:
            value["i"] = self.half_open_issued
            value["n"] = self.half_open_calls
            value["f"] = self.half_open_failures
            value["h"] = self.half_open_at_ms
        return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes, config: BreakerConfig) -> Breaker:
        """A stored breaker under the current config. A window longer than the config's keeps
        its most recent outcomes; a CLOSED window already over a new threshold opens on its
        next outcome; an OPEN breaker waits the new `wait_open_ms` from when it opened; a
        HALF_OPEN trial keeps its permits and outcomes if they fit the new
        `permitted_half_open`, and otherwise starts over (its outcomes dropped, answers to its
        outstanding calls ignored), so a shrunk trial never waits for outcomes it can no
        longer get."""
        try:
            value = json.loads(raw)
            state = BreakerState(value["s"])
            if state is BreakerState.CLOSED:
                bits = str(value["w"])
                if bits.strip("01"):
                    raise ValueError(f"window {bits!r} is not 0s and 1s")
                bits = bits[-config.sliding_window_size :] if bits else ""
                return cls(config, state, int(bits, 2) if bits else 0, len(bits))
            opened_at = int(value["o"])
            if state is BreakerState.OPEN:
                return cls(config, state, opened_at_ms=opened_at)
            issued, calls, failures = int(value["i"]), int(value["n"]), int(value["f"])
            began = int(value.get("h", opened_at + config.wait_open_ms))
            if not 0 <= failures <= calls <= issued:
                raise ValueError(f"trial of {issued} permits, {calls} outcomes, {failures} "
                                 "failures is impossible")  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"stored breaker {raw!r}: {exc}") from exc
        if issued > config.permitted_half_open or calls >= config.permitted_half_open:
            issued = calls = failures = 0
        return cls(config, state, opened_at_ms=opened_at, half_open_issued=issued,
                   half_open_calls=calls, half_open_failures=failures,
                   half_open_at_ms=began)  # fmt: skip

    def _open(self, now_ms: int, rate: int, calls: int, reason: str) -> Transition:
        """Open now: the wait (re)starts."""
        return self._move(BreakerState.OPEN, now_ms, rate, calls, reason, opened_at_ms=now_ms)

    def _move(self, to: BreakerState, now_ms: int, rate: int | None, calls: int, reason: str,
              opened_at_ms: int | None = None) -> Transition:  # fmt: skip
        """Enter `to` with an empty window and no trial; `opened_at_ms` for OPEN, HALF_OPEN."""
        transition = Transition(self.state, to, now_ms, rate, calls, reason)
        self.state = to
        self.window = self.window_calls = 0
        self.opened_at_ms = opened_at_ms
        self.half_open_issued = self.half_open_calls = self.half_open_failures = 0
        self.half_open_at_ms = None
        return transition


__all__ = ["DEFAULT_BREAKER", "Breaker", "BreakerConfig", "BreakerState", "Transition"]
