"""Prometheus `/metrics` for one worker (docs/operations.md#metrics).

Two sources, one registry per worker:

- What the agents count (`paysaga.agents.metrics.METRICS`): the engine hands them to
  `PrometheusSink` only once their transaction committed, so a batch processed twice
  (an abort, a poison record) is counted once, like its outputs.
- What is read at scrape time (`WorkerCollector`): the engine's own counters (batches,
  commits, aborts, rebuilds, fenced, rejoins, refetches, restored records), readiness,
  consumer lag per input partition, and each owned task's gateway breaker from its
  committed store.

Everything is per process and starts from zero with it, as Prometheus counters do; the
alert rules (docker/prometheus/alerts.yml) work on rates and sums across workers.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest as _generate
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from paysaga.agents.metrics import METRICS, VARIANTS
from paysaga.agents.metrics import Metric as MetricDef
from paysaga.domain.breaker import BreakerConfig, BreakerState
from paysaga.streams.engine import ExactlyOnceEngine
from paysaga.streams.engine.metrics import Labels
from paysaga.tables.breaker import BREAKER, describe

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST

#: The engine's counters exported as `paysaga_engine_<name>_total`, with why one moves.
ENGINE_COUNTERS = {
    "records": "Input records committed.",
    "batches": "Batches committed (one Kafka transaction each).",
    "aborts": "Batch attempts aborted (Kafka refused a send or the commit).",
    "dead_letters": "Inputs dead-lettered, counted when processed (see paysaga_dead_letters).",
    "restored": "Changelog records restored into local state.",
    "punctuations": "Wall-clock and stream-time punctuations run.",
    "punctuate_errors": "Punctuations that raised or whose output Kafka refused.",
    "refetches": "Fetched records thrown away and fetched again after a rebuild.",
    "rebuilds": "Tasks closed and opened again (a producer or store could not go on).",
    "fenced": "Tasks fenced by a newer producer of the same transactional id.",
    "rejoins": "Times the worker rejoined its consumer group after being fenced.",
}


class LoopWatch:
    """How late the worker's event loop runs a short timer: the time a view, a heartbeat or
    another task's commit waits for a turn, as `paysaga_event_loop_lag_seconds`. Each late
    tick's lag is split by the main thread's CPU time over it: busy (the loop ran code: a
    batch's slice, a commit being built, a collection) or waiting (for a core, or in a
    blocking call), as `paysaga_event_loop_late_seconds_total{cause}`."""

    NAME = "paysaga_event_loop_lag_seconds"
    LATE = "paysaga_event_loop_late_seconds"

    def __init__(self, registry: CollectorRegistry, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.histogram = Histogram(
            self.NAME, "How late the event loop ran a 50 ms timer (seconds).",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=registry,
        )  # fmt: skip
        self.late = Counter(self.LATE, "Event-loop lag, by what the main thread did meanwhile.",
                            ["cause"], registry=registry)  # fmt: skip

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked, cpu = loop.time(), time.thread_time()
            await asyncio.sleep(self.interval_s)  # the probe itself: how late it wakes
            lag = max(0.0, loop.time() - asked - self.interval_s)
            self.histogram.observe(lag)
            if lag > 0.001:
                # CPU used beyond the tick's own idle wait is the loop running code.
                busy = min(lag, max(0.0, time.thread_time() - cpu))
                self.late.labels("busy").inc(busy)
                self.late.labels("waiting").inc(lag - busy)


class PrometheusSink:
    """The engine's metric sink over its own registry (one per worker, never the global
    one), with every figure of `METRICS` declared up front."""

    def __init__(self, variants: tuple[str, ...] = ()) -> None:
        self.registry = registry = CollectorRegistry()
        self._counters: dict[str, Counter] = {}
        self._histograms: dict[str, Histogram] = {}
        for m in METRICS:
            if m.histogram:
                self._histograms[m.name] = Histogram(m.name, m.help, m.labels, buckets=m.buckets,
                                                     registry=registry)  # fmt: skip
            else:
                counter = Counter(m.name, m.help, m.labels, registry=registry)
                self._counters[m.name] = counter
                for labels in known_series(m, variants):
                    counter.labels(*labels)  # at zero, so its first increase is seen
        self._failed: set[str] = set()

    def count(self, name: str, labels: Labels, n: float) -> None:
        try:
            counter = self._counters[name]
            (counter.labels(*labels) if labels else counter).inc(n)
        except Exception as exc:
            self._failure(name, exc)

    def observe(self, name: str, labels: Labels, value: float) -> None:
        try:
            histogram = self._histograms[name]
            (histogram.labels(*labels) if labels else histogram).observe(value)
        except Exception as exc:
            self._failure(name, exc)

    def _failure(self, name: str, exc: Exception) -> None:
        """An undeclared figure or a wrong label count: a bug, said once per figure; the
        batch it describes has committed, and that stands."""
        if name not in self._failed:
            self._failed.add(name)
            log.error("metric %r not recorded (%r): is it declared as used in "
                      "paysaga.agents.metrics?", name, exc)  # fmt: skip


def known_series(metric: MetricDef, variants: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Every label set of `metric` whose values are all known in advance (`Metric.known`;
    `VARIANTS` stands for the configured retry strategies)."""
    if not metric.labels or any(label not in metric.known for label in metric.labels):
        return []
    values = [variants if metric.known[label] == (VARIANTS,) else metric.known[label]
              for label in metric.labels]  # fmt: skip
    return list(itertools.product(*values))


class WorkerCollector(Collector):
    """What is read when Prometheus scrapes: the engine, consumer lag, the breakers."""

    def __init__(self, engine: ExactlyOnceEngine, breaker: BreakerConfig) -> None:
        self.engine = engine
        self.breaker = breaker

    def collect(self) -> Iterator[Metric]:
        engine = self.engine
        stats = engine.stats
        for name, why in ENGINE_COUNTERS.items():
            yield CounterMetricFamily(f"paysaga_engine_{name}", why, value=stats.get(name, 0))
        yield CounterMetricFamily("paysaga_engine_restore_seconds",
                                  "Seconds spent restoring local state from changelogs.",
                                  value=stats.get("restore_seconds", 0))  # fmt: skip
        yield GaugeMetricFamily("paysaga_ready", "1 when the worker owns its tasks, restored, "
                                "and Kafka accepts its transactions.",
                                value=1 if engine.ready else 0)  # fmt: skip
        yield GaugeMetricFamily("paysaga_tasks", "Tasks (partition numbers) this worker owns.",
                                value=len(engine.tasks))  # fmt: skip
        yield self._lag()
        yield from self._breakers()

    def _lag(self) -> GaugeMetricFamily:
        """Records not yet committed per input partition: the last stable offset the
        consumer saw (read_committed) minus the task's next offset. Transaction markers
        count as records, so an idle transactional input shows a lag of one or two."""
        lag = GaugeMetricFamily("paysaga_consumer_lag", "Input records not yet processed.",
                                labels=["topic", "partition"])  # fmt: skip
        consumer = self.engine.consumer
        if consumer is None:
            return lag
        for task in list(self.engine.tasks.values()):
            for tp, next_offset in list(task.next_offsets.items()):
                end = consumer.last_stable_offset(tp)
                if end is None:
                    end = consumer.highwater(tp)
                if end is not None:
                    lag.add_metric([tp.topic, str(tp.partition)], max(0, end - next_offset))
        return lag

    def _breakers(self) -> Iterator[Metric]:
        state = GaugeMetricFamily("paysaga_breaker_state",
                                  "Each owned task's gateway breaker: 1 for its current state.",
                                  labels=["partition", "state"])  # fmt: skip
        held = GaugeMetricFamily("paysaga_breaker_held", "Payments the breaker holds, per task.",
                                 labels=["partition"])  # fmt: skip
        for partition in sorted(self.engine.tasks):
            store = self.engine.store(BREAKER, partition)
            if store is None:
                continue
            d = describe(store.get, self.breaker)
            for s in BreakerState:
                state.add_metric([str(partition), s.value], 1 if d["state"] == s.value else 0)
            held.add_metric([str(partition)], float(str(d["held"])))
        yield state
        yield held


def generate(registry: CollectorRegistry) -> bytes:
    """The text exposition format of everything in `registry`."""
    return _generate(registry)
