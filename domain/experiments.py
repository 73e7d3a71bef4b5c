"""The A/B retry experiment's statistics: per-variant counts and the comparison with CONTROL.

Pure domain code. A variant's figures are integer sums (sagas ended, successes, retries,
milliseconds to outcome), so the partitions of the `experiments` table merge by addition
and a replay reproduces them exactly; rates are derived only when reported.

The comparison a payment team needs is "is TEST_A's success rate really different from
CONTROL's, at the sample we have?" The interval for the difference of two proportions is
Newcombe's hybrid score interval (his method 10, built from two Wilson intervals): unlike
the textbook Wald interval it stays inside [-1, 1] and keeps its coverage when a success
rate is near 100 %, which is exactly where payment success rates live. The difference is
significant when the interval excludes 0; `sample_size_per_arm` says how many sagas per
variant would detect the observed difference (two-sided 5 %, 80 % power), so a report can
say "not yet significant: about N more per arm".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

#: Two-sided 95 %: the z of every interval in the report.
Z95 = NormalDist().inv_cdf(0.975)


@dataclass
class VariantStats:
    """One variant's ended sagas, as integer sums."""

    sagas: int = 0
    successes: int = 0
    retries: int = 0
    outcome_ms: int = 0
    #: Sagas of the variant that started (ended or not): `running` are not in the sample.
    started: int = 0

    def add(self, succeeded: bool, retries: int, outcome_ms: int) -> None:
        """Count one ended saga (a negative time, from a clock skew upstream, counts 0)."""
        self.sagas += 1
        self.successes += int(succeeded)
        self.retries += retries
        self.outcome_ms += max(0, outcome_ms)

    def remove(self, succeeded: bool, retries: int, outcome_ms: int) -> None:
        """Take back one `add` of the same figures (a saga counted at an end it left)."""
        self.sagas = max(0, self.sagas - 1)
        self.successes = max(0, self.successes - int(succeeded))
        self.retries = max(0, self.retries - retries)
        self.outcome_ms = max(0, self.outcome_ms - max(0, outcome_ms))

    def start(self) -> None:
        self.started += 1

    @property
    def running(self) -> int:
        """Started and not ended: outside the sample. A variant with longer delays defers
        more of its outcomes, so comparing ended sagas while many run is censored."""
        return max(0, self.started - self.sagas)

    def merged(self, other: VariantStats) -> VariantStats:
        return VariantStats(self.sagas + other.sagas, self.successes + other.successes,
                            self.retries + other.retries, self.outcome_ms + other.outcome_ms,
                            self.started + other.started)  # fmt: skip

    def to_dict(self) -> dict[str, int]:
        return {"n": self.sagas, "ok": self.successes, "r": self.retries, "ms": self.outcome_ms,
                "s": self.started}  # fmt: skip

    @classmethod
    def from_dict(cls, raw: dict[str, int]) -> VariantStats:
        """`s` (started) is absent from values written before it was counted: 0."""
        return cls(int(raw["n"]), int(raw["ok"]), int(raw["r"]), int(raw["ms"]),
                   int(raw.get("s", 0)))  # fmt: skip

    @property
    def success_rate(self) -> float | None:
        return self.successes / self.sagas if self.sagas else None

    @property
    def avg_retries(self) -> float | None:
        return self.retries / self.sagas if self.sagas else None

    @property
    def avg_outcome_ms(self) -> float | None:
        return self.outcome_ms / self.sagas if self.sagas else None


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a proportion; (0, 1) when there is no sample."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Comparison:
    """A variant's success rate against CONTROL's: the difference (variant - control), its
    95 % interval, whether it is significant, and the sample per arm that would detect it."""

    difference: float
    low: float
    high: float
    significant: bool
    needed_per_arm: int | None


def compare(control: VariantStats, variant: VariantStats, z: float = Z95) -> Comparison | None:
    """Newcombe's hybrid score interval for variant - control; None without a sample."""
    if control.sagas == 0 or variant.sagas == 0:
        return None
    p1, p2 = variant.successes / variant.sagas, control.successes / control.sagas
    l1, u1 = wilson_interval(variant.successes, variant.sagas, z)
    l2, u2 = wilson_interval(control.successes, control.sagas, z)
    d = p1 - p2
    low = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return Comparison(d, low, high, low > 0 or high < 0, sample_size_per_arm(p2, p1))


def sample_size_per_arm(p_control: float, p_variant: float, alpha: float = 0.05,
                        power: float = 0.8) -> int | None:  # fmt: skip
    """Sagas per arm for a two-sided test of two proportions to detect this difference
    (the normal approximation); None when the rates are equal (no sample detects it)."""
    if p_control == p_variant:
        return None
    za = NormalDist().inv_cdf(1 - alpha / 2)
    zb = NormalDist().inv_cdf(power)
    pbar = (p_control + p_variant) / 2
    num = za * math.sqrt(2 * pbar * (1 - pbar)) + zb * math.sqrt(
        p_control * (1 - p_control) + p_variant * (1 - p_variant)
    )
    return math.ceil((num / (p_control - p_variant)) ** 2)
