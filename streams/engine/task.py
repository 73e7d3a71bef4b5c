"""One task: partition number p of every source topic and every table, and its producer.

A task is what Kafka Streams calls a StreamTask: the unit that owns a transactional
producer (`transactional.id = <app_id>-task-<p>`), its partition of each store, the poison
list of its inputs, its stream time and its queued records (docs/exactly-once.md#tasks).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord, TopicPartition

from paysaga.streams.engine.metrics import MetricSink, Report, flush
from paysaga.streams.engine.processor import TimerClock
from paysaga.tables.store import PartitionStore

if TYPE_CHECKING:
    from paysaga.streams.engine.journal import Entry

#: Prefix of the offset-commit metadata that carries a task's stream time.
STREAM_TIME_META = "paysaga:st="


class TaskBroken(Exception):
    """The task cannot go on with what it has: close it and open it again (a rebuild)."""


class RebuildRefused(Exception):
    """A reset's rebuild met a record the live run processed and this code refuses: the
    rebuilt state could not be the live one, so the rebuild stops (and says which)."""


def stream_time_metadata(stream_time: int) -> str:
    return f"{STREAM_TIME_META}{stream_time}"


def parse_stream_time(metadata: str | None) -> int:
    """The stream time recorded with a committed offset (-1 if none or unreadable)."""
    if not metadata or not metadata.startswith(STREAM_TIME_META):
        return -1
    raw = metadata[len(STREAM_TIME_META) :]
    return int(raw) if raw.lstrip("-").isdigit() else -1


@dataclass
class Task:
    """One partition number's producer, stores, stream time and poison list."""

    partition: int
    #: None only in the test driver, which commits without Kafka.
    producer: AIOKafkaProducer | None
    stores: dict[str, PartitionStore]
    #: (topic, partition, offset) -> (kind, reason, wall-clock ms of the failure).
    poison: dict[tuple[str, int, int], tuple[str, str, int]] = field(default_factory=dict)
    #: Next offset to process per input partition: the committed offset at assignment,
    #: then advanced by every commit. Records below it were already committed here (a
    #: fetch made before a seek can deliver them again) and are never processed twice.
    next_offsets: dict[TopicPartition, int] = field(default_factory=dict)
    #: The highest event time the task's committed inputs carried (-1: none yet). Kept in
    #: Kafka with the input offsets of every commit (their metadata), so it survives
    #: restarts, restores and moves to another worker exactly like the offsets do.
    stream_time: int = -1
    committed_batches: int = 0
    #: Fetched records waiting for this task's next batch, per input partition, in order.
    inbox: dict[TopicPartition, list[ConsumerRecord]] = field(default_factory=dict)
    runner: asyncio.Future[None] | None = None
    #: When (monotonic) the task's last batch of inputs started: the commit interval's mark.
    batch_started: float = 0.0
    #: Set when the task's queue holds a full batch, or when the task is being closed: a
    #: runner waiting out the commit interval starts (or stops) at once.
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    closing: bool = False
    #: Why this task's last attempt failed (None once a batch committed again).
    failure: str | None = None
    #: Its input partitions are paused because it has too much queued (backpressure).
    paused: bool = False
    #: Input partitions that reached their stop offset (a bounded run): never resumed.
    done: set[TopicPartition] = field(default_factory=set)
    #: Whether a wall-clock punctuation is due, and when each schedule last ran (monotonic).
    tick: bool = False
    last_tick: float = 0.0
    wall_runs: dict[str, float] = field(default_factory=dict)
    #: Earliest due time per timer / window index ("t:<name>", "w:<name>").
    clocks: dict[str, TimerClock] = field(default_factory=dict)
    #: Idle policy: wall clock (monotonic) and stream time at the last real input, and
    #: when the last stream-time tick was written.
    idle_since: float = field(default_factory=time.monotonic)
    idle_base: int = -1
    last_tick_write: float = 0.0
    #: What the current attempt would change in the bookkeeping above, applied only once
    #: it commits (`attempt_committed`): an aborted attempt must leave no trace here.
    pending_wall: dict[str, float] = field(default_factory=dict)
    pending_tick_write: float | None = None
    #: What the attempt's agents counted (`ProcessorContext.count`), for the sink on commit.
    pending_metrics: list[Report] = field(default_factory=list)
    _attempt_open: bool = False
    #: The wall clock of the current attempt: every agent call in it reads this one value
    #: (`ProcessorContext.wall_clock_ms`), so a replay can give it back (the journal).
    attempt_now: int = 0
    #: The schedules the current wall-clock punctuation ran (None: a batch of inputs).
    attempt_ticked: list[str] | None = None
    #: Inputs of the current attempt an agent's decoder refused (their dead letters), for
    #: the journal: a rebuild tells a decode failure the live run had from a new one.
    attempt_decoded: list[tuple[str, int, int]] = field(default_factory=list)
    #: The journal entry the current attempt re-executes (a replay's), else None.
    attempt_entry: Entry | None = None

    def queued(self) -> int:
        return sum(len(records) for records in self.inbox.values())

    def enqueue(self, tp: TopicPartition, records: list[ConsumerRecord], full: int) -> int:
        """Queue fetched records of input partition `tp`; how many are queued now. At
        `full` (a whole batch) a runner waiting out the commit interval is woken."""
        self.inbox.setdefault(tp, []).extend(records)
        queued = self.queued()
        if queued >= full:
            self.wake.set()
        return queued

    def begin_attempt(self) -> None:
        """Start an attempt at a batch. After one that did not commit, the timer clocks are
        forgotten (a scan of the thrown-away transaction may have raised them past a timer
        that is still armed in the store): the next scan finds the truth again."""
        if self._attempt_open:
            for clock in self.clocks.values():
                clock.earliest = None
        self._attempt_open = True
        self.pending_wall.clear()
        self.pending_tick_write = None
        self.pending_metrics.clear()

    def attempt_committed(self, sink: MetricSink) -> None:
        self._attempt_open = False
        flush(self.pending_metrics, sink)
        self.wall_runs.update(self.pending_wall)
        if self.pending_tick_write is not None:
            self.last_tick_write = self.pending_tick_write
