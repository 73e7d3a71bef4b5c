"""Valid sample events for tests, built from the upstream simulator's generator."""

from __future__ import annotations

from typing import Any

from paysaga.streams.dev.upstream import UpstreamConfig, generate


def initiated(n: int, seed: int = 7, **overrides: Any) -> list[dict[str, Any]]:
    """`n` distinct valid PaymentInitiated dicts (no duplicates or conflicts)."""
    cfg = UpstreamConfig(count=n, seed=seed, duplicate_rate=0.0, conflict_rate=0.0)
    return [{**e, **overrides} for e in generate(cfg)]
