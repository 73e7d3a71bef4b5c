"""A test driver for topologies: real agents, real RocksDB, no broker (TopologyTestDriver).

    driver = TopologyTestDriver(topology, tmp_path, partitions=3)
    driver.pipe("payment.initiated", value, key=b"k", timestamp=1_000)
    driver.outputs("payment.status")      # what was emitted, with timestamps and partitions
    driver.table("payments", partition=1) # the committed table contents
    driver.advance_wall_clock(10_000)      # wall-clock schedules and timers

Each piped record is one batch of its task, run by the engine's own `TaskRunner` (the same
decoding, dead letters, poison handling, stream time, schedules, timers and windows) and
"committed" by applying its state transaction to the stores, as the engine does after a
Kafka commit. Outputs to a topic the topology reads (a repartition topic, the tick topic)
are fed back as input, as a broker would. For fast unit tests of agent logic; every
capability also has an end-to-end test through a real broker (docs/architecture.md#testing).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path

from aiokafka.structs import ConsumerRecord, TopicPartition

from paysaga.streams.engine.commit import settle
from paysaga.streams.engine.config import EngineConfig
from paysaga.streams.engine.metrics import MemorySink
from paysaga.streams.engine.partitioner import partition_for
from paysaga.streams.engine.processor import Output, TimerClock
from paysaga.streams.engine.runner import TaskRunner
from paysaga.streams.engine.state import EngineState
from paysaga.streams.engine.task import Task
from paysaga.streams.engine.topology import Topology
from paysaga.tables.store import StoreManager
from paysaga.tables.transaction import TaskTransaction


@dataclass(frozen=True)
class OutputRecord:
    """One record the topology emitted, as the broker would have stored it."""

    topic: str
    partition: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    timestamp: int | None

    def header(self, name: str) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


class DriverClock:
    """A wall clock (and monotonic clock) that moves only when the test says so."""

    def __init__(self, wall_ms: int) -> None:
        self.now_ms = wall_ms

    def wall_ms(self) -> int:
        return self.now_ms

    def monotonic(self) -> float:
        return self.now_ms / 1000


class TopologyTestDriver:
    def __init__(
        self,
        topology: Topology,
        state_dir: Path,
        *,
        partitions: int = 1,
        dlq_topic: str = "dlq",
        wall_ms: int = 0,
        tick_topic: str | None = None,
        idle_ms: int = 5_000,
        redact: type[str] | None = None,
    ) -> None:
        config = EngineConfig(
            bootstrap="driver", app_id="driver", dlq_topic=dlq_topic,
            changelog=lambda t: f"driver-{t}-changelog", punctuate_ms=0,
            tick_topic=tick_topic, idle_ms=idle_ms, redact=redact or str,
        )  # fmt: skip
        self.partitions = partitions
        self.clock = DriverClock(wall_ms)
        runtime = topology.runtime(dlq_topic, config.redact)
        self.state = EngineState(config=config, topology=topology, stores=StoreManager(state_dir),
                                 routes=topology.by_source(), runtime=runtime,
                                 tables=topology.tables)  # fmt: skip
        self.runner = TaskRunner(self.state, None, self.clock)
        self.sources = set(topology.sources) | ({tick_topic} if tick_topic else set())
        self._offsets: dict[TopicPartition, int] = {}
        self._changelog_offsets: dict[tuple[str, int], int] = {}
        self.emitted: list[OutputRecord] = []

    # ---- input --------------------------------------------------------------------------
    def pipe(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        *,
        partition: int | None = None,
        timestamp: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        aborts: int = 0,
    ) -> list[OutputRecord]:
        """Process one input record (and whatever it feeds back); returns what it emitted.

        `aborts`: attempts at the input's batch thrown away before the one that commits, as
        when Kafka refuses a commit and the engine processes the batch again."""
        if partition is None:
            partition = 0 if key is None else partition_for(key, self.partitions)
        ts = self.clock.now_ms if timestamp is None else timestamp
        first = len(self.emitted)
        self._drain([self._record(topic, partition, key, value, ts, headers or [])], aborts)
        return self.emitted[first:]

    def advance_wall_clock(self, ms: int) -> list[OutputRecord]:
        """Move the wall clock on and run every task's wall-clock punctuation once."""
        self.clock.now_ms += ms
        first = len(self.emitted)
        for p in range(self.partitions):
            task = self._task(p)
            task.begin_attempt()
            txn = TaskTransaction(task.stores)
            outputs: list[Output] = []
            if self.runner.run_wall_clock(task, txn, outputs):
                self._commit(task, txn, [], task.stream_time)
                task.attempt_committed(self.state.metrics)
                self._drain(self._feed_back(self._emit(outputs)))
        return self.emitted[first:]

    # ---- what tests read ----------------------------------------------------------------
    @property
    def metrics(self) -> MemorySink:
        """The committed figures the agents counted (streams/engine/metrics.py)."""
        sink = self.state.metrics
        assert isinstance(sink, MemorySink)
        return sink

    def outputs(self, topic: str | None = None) -> list[OutputRecord]:
        return [r for r in self.emitted if topic is None or r.topic == topic]

    def table(self, name: str, partition: int | None = None) -> dict[bytes, bytes]:
        """Committed contents of a table (one partition, or all), reserved keys included."""
        parts = range(self.partitions) if partition is None else [partition]
        out: dict[bytes, bytes] = {}
        for p in parts:
            out.update(self._task(p).stores[name].items())
        return out

    def stream_time(self, partition: int = 0) -> int:
        return self._task(partition).stream_time

    def close(self) -> None:
        for task in self.state.tasks.values():
            for store in task.stores.values():
                store.close()
        self.state.tasks.clear()

    # ---- internals ----------------------------------------------------------------------
    def _task(self, p: int) -> Task:
        task = self.state.tasks.get(p)
        if task is None:
            stores = {t: self.state.stores.open(t, p) for t in self.state.tables}
            clocks = {n: TimerClock() for n in self.state.runtime.clock_names}
            task = Task(p, None, stores, clocks=clocks)
            task.idle_since = self.clock.monotonic()
            self.state.tasks[p] = task
        return task

    def _record(self, topic: str, partition: int, key: bytes | None, value: bytes | None,
                ts: int, headers: list[tuple[str, bytes]]) -> ConsumerRecord:  # fmt: skip
        tp = TopicPartition(topic, partition)
        offset = self._offsets.get(tp, 0)
        self._offsets[tp] = offset + 1
        return ConsumerRecord(topic, partition, offset, ts, 0, key, value, None,
                              len(key or b""), len(value or b""), tuple(headers))  # fmt: skip

    def _drain(self, records: list[ConsumerRecord], aborts: int = 0) -> None:
        queue = deque(records)
        while queue:
            record = queue.popleft()
            emitted = self._run(self._task(record.partition), [record], aborts)
            queue.extend(self._feed_back(emitted))
            aborts = 0

    def _run(
        self, task: Task, records: list[ConsumerRecord], aborts: int = 0
    ) -> list[OutputRecord]:
        while True:  # again after a poison record was marked, as the engine does
            task.begin_attempt()
            txn = TaskTransaction(task.stores)
            outputs: list[Output] = []
            stream_time = self.runner.run_records(task, txn, outputs, records)
            if stream_time is not None and aborts:
                aborts -= 1  # this attempt's commit "failed": its transaction is dropped
                continue
            if stream_time is not None:
                break
        self._commit(task, txn, records, stream_time)
        task.attempt_committed(self.state.metrics)
        return self._emit(outputs)

    def _commit(self, task: Task, txn: TaskTransaction, records: list[ConsumerRecord],
                stream_time: int) -> None:  # fmt: skip
        for name, table_txn in txn.changed():
            slot = (name, task.partition)
            offset = self._changelog_offsets.get(slot, -1) + len(table_txn.changes)
            self._changelog_offsets[slot] = offset
            task.stores[name].apply(table_txn.changes, offset)
        settle(self.state, task, records, stream_time)

    def _emit(self, outputs: list[Output]) -> list[OutputRecord]:
        emitted = []
        for topic, key, value, headers, index, ts, pinned in outputs:
            if pinned is not None:
                part = pinned
            else:
                part = (
                    partition_for(key, self.partitions)
                    if key is not None
                    else index % self.partitions
                )
            emitted.append(OutputRecord(topic, part, key, value, tuple(headers or ()), ts))
        self.emitted.extend(emitted)
        return emitted

    def _feed_back(self, outputs: list[OutputRecord]) -> list[ConsumerRecord]:
        """Outputs to a topic the topology reads come back as its input."""
        return [
            self._record(
                o.topic,
                o.partition,
                o.key,
                o.value,
                o.timestamp if o.timestamp is not None else self.clock.now_ms,
                list(o.headers),
            )
            for o in outputs
            if o.topic in self.sources
        ]
