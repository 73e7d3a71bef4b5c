"""The state the fetch loop, the task manager and the task runners share, in one object.

Kafka Streams keeps the equivalent spread over StreamThread and TaskManager fields; here it
is one explicit object so each module's reads and writes of it are visible, and every
change of the assignment happens under `lock` (docs/exactly-once.md#rebalance).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from paysaga.streams.engine.config import EngineConfig
from paysaga.streams.engine.metrics import MemorySink, MetricSink
from paysaga.streams.engine.processor import Agent, ContextRuntime
from paysaga.streams.engine.task import Task
from paysaga.streams.engine.topology import Topology
from paysaga.tables.store import StoreManager

STAT_NAMES = (
    "records", "batches", "aborts", "dead_letters", "restored", "restore_seconds",
    "send_seconds", "offsets_seconds", "commit_seconds", "punctuations", "punctuate_errors",
    "refetches", "rebuilds", "fenced", "rejoins", "ticks",
)  # fmt: skip


@dataclass
class EngineState:
    config: EngineConfig
    topology: Topology
    stores: StoreManager
    #: Source topic -> its agents, in declaration order (fan-out).
    routes: dict[str, tuple[Agent, ...]]
    runtime: ContextRuntime
    tables: tuple[str, ...]
    consumer: AIOKafkaConsumer | None = None
    tasks: dict[int, Task] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: Bumped by every assignment change; a batch fetched under an older generation is
    #: discarded whole, because its positions were reset by the seek to committed.
    generation: int = 0
    #: Bumped by every rebuild's install; `installed_at[p]` is its value when task p was
    #: last installed. Only that partition's records fetched before are stale: the other
    #: tasks keep theirs (discarding them would skip records for good).
    installs: int = 0
    installed_at: dict[int, int] = field(default_factory=dict)
    partition_counts: dict[str, int] = field(default_factory=dict)
    assigned: bool = False
    #: Assigned partition numbers whose task is being opened (restored) after the
    #: assignment, off aiokafka's callback.
    opening: set[int] = field(default_factory=set)
    #: The fetch loop died: nothing is consumed any more (the worker must be restarted).
    fatal: str | None = None
    #: Assigned partition numbers whose task is not open, and why.
    broken: dict[int, str] = field(default_factory=dict)
    #: Partition numbers the group gave us (acquire adds, release removes). Repairs use it,
    #: not `consumer.assignment()`, which still lists revoked partitions until aiokafka
    #: applies the next assignment.
    owned: set[int] = field(default_factory=set)
    #: Set when a task was fenced: the fetch loop makes the worker rejoin the group.
    rejoin: str | None = None
    stats: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAT_NAMES, 0))
    #: Where committed figures go (`ProcessorContext.count`, streams/engine/metrics.py).
    metrics: MetricSink = field(default_factory=MemorySink)

    def inputs(self, partitions: set[int]) -> list[TopicPartition]:
        """The assigned input partitions of these task numbers."""
        consumer = self.consumer
        assert consumer is not None
        return [tp for tp in consumer.assignment() if tp.partition in partitions]

    def pause(self, p: int) -> None:
        if self.consumer is not None:
            self.consumer.pause(*self.inputs({p}))

    def resume(self, task: Task) -> None:
        """Resume a task's input partitions, except those that reached their stop."""
        if self.consumer is not None and self.tasks.get(task.partition) is task:
            tps = [tp for tp in self.inputs({task.partition}) if tp not in task.done]
            self.consumer.resume(*tps)

    def current(self, task: Task) -> bool:
        """The task is still installed and not being closed."""
        return not task.closing and self.tasks.get(task.partition) is task
