"""Retry policy: error classes, retry levels with backoff, and A/B retry strategies.

Pure domain code (no Faust, no Kafka): the saga orchestrator asks it what a failure is and
when, if ever, the next attempt goes out; docs/retries.md is the design record.

- **Error classes** are decided here and nowhere else (`classify`): a *transient* failure
  (the gateway said 503: it did nothing) is retried; a *permanent* one (declined, invalid
  card, fraud, validation) never is; an *unknown* outcome (no answer: the gateway may have
  acted) is first resolved by an inquiry about the idempotency key, and only a "never seen"
  is retried, with the same key.
- **Levels**: retry n of a command falls in the level whose cumulative attempt budget
  covers n (seed 000: 2, 2, 2 and 3 retries at levels 1-4); each level has its delay.
- **Variants** (A/B strategies) change the delays of the levels, not their budgets. A
  customer's variant is a stable hash of the customer id (SHA-256, never Python's salted
  `hash()`, which changes between processes), so every worker, restart and replay assigns
  the same customer the same variant.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import StrEnum


class ErrorClass(StrEnum):
    TRANSIENT = "transient"
    UNKNOWN = "unknown"
    PERMANENT = "permanent"


#: The gateway's answer to an inquiry about a key it never saw (PaymentFailed.reason_code).
NEVER_SEEN = "never_seen"
#: The step name the gateway puts on its answer to an inquiry.
INQUIRY_STEP = "inquire"


def classify(retryable: bool) -> ErrorClass:
    """The class of a failure the service answered with. Only the service knows whether it
    acted; a failure it flags retryable is one it guarantees had no effect (a 503)."""
    return ErrorClass.TRANSIENT if retryable else ErrorClass.PERMANENT


def gateway_failed(kind: str, retryable: bool, code: str | None) -> bool:
    """Does an answer count as a failed call for the gateway's circuit breaker? Only a
    transient failure (the gateway could not act); a decline is the gateway working, and
    "never seen" is the gateway answering an inquiry."""
    return kind == "FAILED" and retryable and code != NEVER_SEEN


def answer_result(kind: str, retryable: bool, code: str | None) -> str:
    """What a gateway answer says, for the decline and gateway-error rates: `ok`,
    `declined` (a permanent failure), `error` (it could not act: `gateway_failed`), or
    `never_seen` (an inquiry about a key it never got)."""
    if kind != "FAILED":
        return "ok"
    if code == NEVER_SEEN:
        return "never_seen"
    return "error" if gateway_failed(kind, retryable, code) else "declined"


@dataclass(frozen=True)
class Variant:
    """One retry strategy: its share of customers (a weight) and its delay per level."""

    name: str
    weight: int
    delays_ms: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.name or ":" in self.name or ";" in self.name:
            raise ValueError(f"variant name {self.name!r} must be non-empty, without ':' or ';'")
        if self.weight < 0:
            raise ValueError(f"variant {self.name}: weight must be >= 0, got {self.weight}")
        if not self.delays_ms or any(d < 0 for d in self.delays_ms):
            raise ValueError(f"variant {self.name}: delays must be >= 0 ms, one per level")


CONTROL = Variant("CONTROL", 50, (1_000, 5_000, 30_000, 300_000))
TEST_A = Variant("TEST_A", 25, (500, 2_000, 10_000, 60_000))
TEST_B = Variant("TEST_B", 25, (2_000, 10_000, 60_000, 600_000))

#: Buckets of the customer hash: allocation is exact to 1/10,000.
BUCKETS = 10_000


def bucket(customer_id: str) -> int:
    """The customer's stable bucket in [0, BUCKETS)."""
    digest = hashlib.sha256(customer_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


@dataclass(frozen=True)
class RetryPolicy:
    """Retries per level (seed 000: 2, 2, 2, 3) and the variants that set their delays."""

    attempts: tuple[int, ...] = (2, 2, 2, 3)
    variants: tuple[Variant, ...] = (CONTROL, TEST_A, TEST_B)
    _by_name: dict[str, Variant] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.attempts or any(a < 1 for a in self.attempts):
            raise ValueError(f"retries per level must be >= 1, got {self.attempts}")
        if not self.variants:
            raise ValueError("at least one retry variant is needed")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names repeat: {names}")
        if sum(v.weight for v in self.variants) <= 0:
            raise ValueError("the variants' weights must add up to more than 0")
        for v in self.variants:
            if len(v.delays_ms) != len(self.attempts):
                raise ValueError(f"variant {v.name} has {len(v.delays_ms)} delays for "
                                 f"{len(self.attempts)} levels")  # fmt: skip
        object.__setattr__(self, "_by_name", {v.name: v for v in self.variants})

    @property
    def levels(self) -> int:
        return len(self.attempts)

    @property
    def max_retries(self) -> int:
        """Retries of one command before it is given up (to the DLQ for manual review)."""
        return sum(self.attempts)

    def variant_for(self, customer_id: str) -> Variant:
        """The customer's variant: its bucket against the cumulative weights."""
        total = sum(v.weight for v in self.variants)
        point = bucket(customer_id) * total // BUCKETS
        for v in self.variants:
            if point < v.weight:
                return v
            point -= v.weight
        raise AssertionError("unreachable: point < total")

    def variant(self, name: str | None) -> Variant:
        """A payment's recorded variant; one the configuration no longer has (or none, a
        payment from before variants) retries as the first, the control."""
        return self._by_name.get(name or "", self.variants[0])

    def level_of(self, retry: int) -> int | None:
        """The level (1-based) of retry number `retry` (1-based), None past the last."""
        budget = 0
        for level, n in enumerate(self.attempts, start=1):
            budget += n
            if retry <= budget:
                return level
        return None

    def delay_ms(self, variant: str | None, level: int) -> int:
        return self.variant(variant).delays_ms[level - 1]

    @classmethod
    def parse(cls, attempts: str, variants: str) -> RetryPolicy:
        """From settings: ``"2,2,2,3"`` and ``"CONTROL:50:1000,5000,30000,300000;..."``."""
        try:
            per_level = tuple(int(a) for a in attempts.split(","))
        except ValueError as exc:
            raise ValueError(f"retry attempts {attempts!r}: comma-separated integers") from exc
        parsed = []
        for spec in filter(None, (s.strip() for s in variants.split(";"))):
            try:
                name, weight, delays = spec.split(":")
                parsed.append(Variant(name, int(weight),
                                      tuple(int(d) for d in delays.split(","))))  # fmt: skip
            except ValueError as exc:
                raise ValueError(f"retry variant {spec!r}: NAME:WEIGHT:MS,MS,... ({exc})") from exc
        return cls(per_level, tuple(parsed))

    def spec(self) -> tuple[str, str]:
        """The inverse of `parse` (settings defaults are written from the policy)."""
        return (",".join(map(str, self.attempts)),
                ";".join(f"{v.name}:{v.weight}:{','.join(map(str, v.delays_ms))}"
                         for v in self.variants))  # fmt: skip


DEFAULT_ATTEMPTS, DEFAULT_VARIANTS = RetryPolicy().spec()

__all__ = [
    "BUCKETS", "CONTROL", "DEFAULT_ATTEMPTS", "DEFAULT_VARIANTS", "INQUIRY_STEP", "NEVER_SEEN",
    "TEST_A", "TEST_B", "ErrorClass", "RetryPolicy", "Variant", "bucket", "classify",
]  # fmt: skip
