"""What agents count, kept with their transaction and handed on only once it commits.

An agent reports a counter (`ProcessorContext.count`) or an observation (`observe`, for a
histogram) by name and label values. The engine keeps each with the task's attempt
(`Task.pending_metrics`) and gives them to the sink when that attempt commits: an aborted
attempt, or one run again without a poison record, is processed again, and counting it
each time would make one decline look like two. So the figures describe committed work
exactly as often as the outputs do (docs/architecture.md#metrics).

The engine knows names and label values only. The sink is the application's (paysaga's is
a Prometheus registry, `paysaga.streams.ops.metrics`); `MemorySink` is for the test driver.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Protocol

Labels = tuple[str, ...]
#: A staged report: (is an observation, name, label values, amount or observed value).
Report = tuple[bool, str, Labels, float]

#: The engine's own figures (the application's sink declares them beside its own).
#: Dead letters written, by kind: the input's (decode, validation, ...) or a review's.
DEAD_LETTERS = "paysaga_dead_letters"
#: Seconds from a batch's first offset send to its commit returning (one per commit).
COMMIT_SECONDS = "paysaga_engine_commit_seconds"


class MetricSink(Protocol):
    """Where committed figures go."""

    def count(self, name: str, labels: Labels, n: float) -> None: ...

    def observe(self, name: str, labels: Labels, value: float) -> None: ...


class MemorySink:
    """Committed figures kept in memory (the test driver's, and a worker's default)."""

    def __init__(self) -> None:
        self.counts: defaultdict[tuple[str, Labels], float] = defaultdict(float)
        self.observations: defaultdict[tuple[str, Labels], list[float]] = defaultdict(list)

    def count(self, name: str, labels: Labels, n: float) -> None:
        self.counts[(name, labels)] += n

    def observe(self, name: str, labels: Labels, value: float) -> None:
        self.observations[(name, labels)].append(value)


def flush(pending: list[Report], sink: MetricSink) -> None:
    """Hand a committed attempt's reports to the sink. Counts are summed per series first:
    a batch of a thousand payments reports a few thousand counts into a few dozen series,
    and a sink's per-call cost (a label lookup and a lock, in prometheus_client) is then
    paid per series, not per count. Observations go one by one (a histogram needs each)."""
    counts: dict[tuple[str, Labels], float] = {}
    for observed, name, labels, value in pending:
        if observed:
            sink.observe(name, labels, value)
        else:
            series = (name, labels)
            counts[series] = counts.get(series, 0) + value
    for (name, labels), n in counts.items():
        sink.count(name, labels, n)
    pending.clear()
