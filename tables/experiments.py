"""The `experiments` table: the A/B retry strategies' statistics, per variant.

Key: the variant's name; value: compact JSON of `paysaga.domain.experiments.VariantStats`
(integer sums only). Each partition of the table counts the sagas that ended on its task,
so a variant's figures are the merge of every partition's, which `paysaga experiments
report` reads from the changelog (`<app_id>-experiments-changelog`, the last value per
partition and key). One write per ended saga, into a key every ended saga of the variant
shares: the batch's transaction keeps one changelog record per key, not one per saga.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from paysaga.domain.experiments import VariantStats
from paysaga.tables.transaction import TableTransaction

EXPERIMENTS = "experiments"


def _update(table: TableTransaction, variant: str, change: Callable[[VariantStats], None]) -> None:
    key = variant.encode()
    raw = table.get(key)
    stats = VariantStats() if raw is None else VariantStats.from_dict(json.loads(raw))
    change(stats)
    table.set(key, json.dumps(stats.to_dict(), separators=(",", ":")).encode())


def record_start(table: TableTransaction, variant: str) -> None:
    """Count one started saga of `variant` (the report says how many have not ended)."""
    _update(table, variant, VariantStats.start)


def record_outcome(table: TableTransaction, variant: str, succeeded: bool, retries: int,
                   outcome_ms: int) -> None:  # fmt: skip
    """Count one ended saga of `variant`."""
    _update(table, variant, lambda s: s.add(succeeded, retries, outcome_ms))


def withdraw_outcome(table: TableTransaction, variant: str, succeeded: bool, retries: int,
                     outcome_ms: int) -> None:  # fmt: skip
    """Take back one count of `record_outcome` (an IN_DOUBT saga taken up again)."""
    _update(table, variant, lambda s: s.remove(succeeded, retries, outcome_ms))


def merge_partitions(latest: dict[tuple[int, bytes], bytes]) -> dict[str, VariantStats]:
    """Every variant's statistics from the last changelog value of each (partition, key)."""
    out: dict[str, VariantStats] = {}
    for (_, key), raw in sorted(latest.items()):
        name = key.decode()
        stats = VariantStats.from_dict(json.loads(raw))
        out[name] = out[name].merged(stats) if name in out else stats
    return out
