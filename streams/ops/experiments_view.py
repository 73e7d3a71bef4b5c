"""`paysaga experiments report`: the A/B retry strategies compared, from the committed
changelog of the `experiments` table (read_committed), so it needs no worker running.

Each partition of the table holds the counts of the sagas that ended on its task; the last
changelog value of each (partition, variant) is that partition's current count, and a
variant's figures are the sum over partitions (`paysaga.tables.experiments`). The success
rate of each variant is compared with CONTROL's by `paysaga.domain.experiments.compare`
(docs/retries.md says why that interval).
"""

from __future__ import annotations

from typing import TextIO

from rich.console import Console
from rich.table import Table

from paysaga.domain.experiments import VariantStats, compare, wilson_interval
from paysaga.streams.app.kafka_io import read_all
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import changelog_topic
from paysaga.tables.experiments import EXPERIMENTS, merge_partitions


async def load(settings: Settings) -> dict[str, VariantStats]:
    """Every variant's statistics, summed over the table's partitions."""
    latest: dict[tuple[int, bytes], bytes] = {}
    for r in await read_all(settings.bootstrap, changelog_topic(settings, EXPERIMENTS)):
        if r.key is None:
            continue
        if r.value is None:
            latest.pop((r.partition, r.key), None)  # a tombstone: the partition was reset
        else:
            latest[(r.partition, r.key)] = r.value
    return merge_partitions(latest)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def render_report(stats: dict[str, VariantStats], control: str, out: TextIO) -> int:
    """The per-variant table and, for each variant, its difference from `control`."""
    console = Console(file=out, width=160)
    total = sum(s.sagas for s in stats.values())
    if not total:
        console.print("no ended sagas counted yet: the experiment has no sample")
        return 0
    table = Table(title=f"retry experiment: {total} ended sagas")
    for col in ("variant", "sagas", "running", "success rate", "95% CI", "avg retries",
                "avg time to outcome", "vs " + control, "95% CI of the difference",
                "significant"):  # fmt: skip
        table.add_column(col, justify="left" if col == "variant" else "right")
    base = stats.get(control)
    notes = []
    for name in sorted(stats, key=lambda n: (n != control, n)):
        s = stats[name]
        lo, hi = wilson_interval(s.successes, s.sagas)
        cmp = None if base is None or name == control else compare(base, s)
        if cmp is None:
            diff = ci = sig = "-"
        else:
            diff = f"{100 * cmp.difference:+.2f} pp"
            ci = f"[{100 * cmp.low:+.2f}, {100 * cmp.high:+.2f}] pp"
            sig = "yes" if cmp.significant else "no"
            if not cmp.significant:
                need = cmp.needed_per_arm
                notes.append(
                    f"{name}: not significant at {s.sagas} vs {base.sagas if base else 0} "
                    + ("(the rates are equal: no sample size separates them)" if need is None
                       else f"(about {need} sagas per arm would detect "
                            f"{100 * abs(cmp.difference):.2f} pp)")
                )  # fmt: skip
        avg_ms = s.avg_outcome_ms
        table.add_row(name, str(s.sagas), str(s.running), _pct(s.success_rate),
                      f"[{_pct(lo)}, {_pct(hi)}]",
                      "-" if s.avg_retries is None else f"{s.avg_retries:.3f}",
                      "-" if avg_ms is None else f"{avg_ms / 1000:.2f} s", diff, ci,
                      sig)  # fmt: skip
    console.print(table)
    if base is None:
        console.print(f"no {control} sagas yet: nothing to compare against", highlight=False)
    for note in notes:
        console.print(note, highlight=False)
    running = sum(s.running for s in stats.values())
    if running:
        console.print(
            f"{running} sagas have started and not ended: every figure is over ended sagas "
            "only, and a variant with longer delays defers more of its outcomes, so a "
            "difference now may be censoring, not the strategy; read significance once "
            "they have ended", highlight=False)  # fmt: skip
    return 0
