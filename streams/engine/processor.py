"""The processor API: what an agent declares and what it sees while it runs.

Modelled on Kafka Streams' Processor API (docs/architecture.md#the-processor-api): an
`Agent` declares its sources, the tables it uses, how its input is decoded and where its
event time comes from, its schedules (stream-time or wall-clock punctuation), its durable
per-key timers and its event-time windows. While it runs, a `ProcessorContext` gives it the
batch's table transactions (only the declared ones), typed emits encoded once by the
topology's serializer, the task's stream time, and dead letters. Everything an agent does
inside one call lands in its task's Kafka transaction, or nowhere.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from aiokafka.structs import ConsumerRecord

from paysaga.streams.engine.deadletter import DeadLetter
from paysaga.streams.engine.metrics import DEAD_LETTERS, Report
from paysaga.tables.timers import KeyedTimers
from paysaga.tables.windows import Window, Windows, WindowStore

if TYPE_CHECKING:
    from paysaga.tables.transaction import TableTransaction, TaskTransaction

#: One queued output: topic, key, value, headers, index of the causing input, timestamp,
#: and a partition it is pinned to (None: paysaga's partitioner decides by key).
Output = tuple[
    str, bytes | None, bytes | None, list[tuple[str, bytes]] | None, int, int | None, int | None
]
#: Encodes a record of a named schema (the topology's one codec), e.g. Avro.
Serializer = Callable[[str, Mapping[str, Any]], bytes]


class PunctuationType(StrEnum):
    """What drives a schedule or a timer (Kafka Streams' PunctuationType)."""

    #: The task's stream time: the highest event time its inputs carried. Deterministic:
    #: a replay of the same input fires at the same points.
    STREAM_TIME = "stream_time"
    #: The wall clock, checked by the fetch loop every `EngineConfig.punctuate_ms`.
    WALL_CLOCK = "wall_clock"


class BadRecord(Exception):
    """Raised by a decoder: the input cannot be processed; it goes to the dead-letter topic
    with `kind` and `reason`, and the stream goes on (no retry: it would fail again)."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


class UndeclaredTable(LookupError):
    """An agent used a table (or window, or timer) it did not declare."""


class TopologyError(ValueError):
    """The topology cannot run as declared (refused when it is built, never at run time)."""


@dataclass(frozen=True)
class Schedule:
    """A punctuation of one agent: `callback(ctx, time)` every `interval_ms`.

    Stream-time schedules fire when the task's stream time crosses a multiple of the
    interval (aligned to the epoch, so restarts and replays fire at the same points);
    wall-clock ones when that much wall-clock time passed since they last ran.
    """

    name: str
    interval_ms: int
    type: PunctuationType
    callback: Callable[[ProcessorContext, int], None]


@dataclass(frozen=True)
class Timer:
    """Durable per-key timers of one agent, kept in `table` (changelogged with it).

    The agent arms one with `ctx.timers(name).set(key, due)` (one per key: setting again
    moves it) and the engine calls `on_fire(ctx, key, due)` once the clock of `type` reaches
    `due`, in a transaction like any batch; a fired timer is gone unless set again.
    """

    name: str
    table: str
    type: PunctuationType
    on_fire: Callable[[ProcessorContext, bytes, int], None]


@dataclass(frozen=True)
class WindowSpec:
    """Event-time windows of one agent, kept in `table`.

    The agent adds to them with `ctx.window(name).update(...)`; the engine closes a window
    once stream time passes its end plus grace, calling `on_close(ctx, window, value)` in
    the same transaction that deletes it, so each window closes exactly once.
    """

    name: str
    table: str
    windows: Windows
    on_close: Callable[[ProcessorContext, Window, bytes], None]


@dataclass(frozen=True)
class Agent:
    """One agent: its sources, tables, decoding, event time, schedules, timers, windows."""

    name: str
    sources: tuple[str, ...]
    #: `process(ctx, value)`: value is what `decode` returned, or the ConsumerRecord.
    process: Callable[[ProcessorContext, Any], None]
    tables: tuple[str, ...] = ()
    decode: Callable[[ConsumerRecord], Any] | None = None
    #: The event time of a decoded value (epoch ms); None: the record's Kafka timestamp.
    event_time: Callable[[Any], int] | None = None
    schedules: tuple[Schedule, ...] = ()
    timers: tuple[Timer, ...] = ()
    windows: tuple[WindowSpec, ...] = ()


class BoundTimers:
    """An agent's timers of one name, inside the current transaction."""

    __slots__ = ("_clock", "_table", "index")

    def __init__(self, index: KeyedTimers, table: TableTransaction, clock: TimerClock) -> None:
        self.index = index
        self._table = table
        self._clock = clock

    def set(self, key: bytes, due: int) -> None:
        self.index.set(self._table, key, due)
        self._clock.armed(due)

    def cancel(self, key: bytes) -> None:
        self.index.cancel(self._table, key)

    def due_of(self, key: bytes) -> int | None:
        return self.index.due_of(self._table, key)


class BoundWindow:
    """An agent's windows of one name, inside the current transaction."""

    __slots__ = ("_clock", "_ctx", "_table", "store")

    def __init__(
        self, store: WindowStore, table: TableTransaction, ctx: ProcessorContext, clock: TimerClock
    ) -> None:
        self.store = store
        self._table = table
        self._ctx = ctx
        self._clock = clock

    def update(
        self, key: bytes, fold: Callable[[Window, bytes | None], bytes], ts: int | None = None
    ) -> list[Window]:
        """Fold the current input into every open window containing `ts` (default: the
        input's event time); returns the windows that were already closed (late: the
        agent's late path handles them, nothing is dropped silently)."""
        when = self._ctx.timestamp if ts is None else ts
        result = self.store.update(self._table, key, when, self._ctx.stream_time, fold)
        for window in result.updated:
            self._clock.armed(window.end + self.store.windows.grace_ms)
        return result.late

    def get(self, key: bytes, start: int) -> bytes | None:
        return self.store.get(self._table, key, start)


class TimerClock:
    """The earliest due time a task's timer index (or window close index) may hold.

    Lets the engine skip the index scan on the many records that cannot fire anything: it
    is lowered whenever something is armed and set by each scan to what the index holds
    next. Too low costs one scan. A scan inside an attempt that then aborts may have raised
    it past a timer the store still holds, so the task forgets every clock after such an
    attempt (`Task.begin_attempt`).
    """

    __slots__ = ("earliest",)

    def __init__(self) -> None:
        self.earliest: int | None = None  # None: unknown (after open): scan once

    def armed(self, due: int) -> None:
        if self.earliest is not None and due < self.earliest:
            self.earliest = due

    def may_fire(self, now: int) -> bool:
        return self.earliest is None or now >= self.earliest


class ProcessorContext:
    """What an agent sees while it processes one input or runs one punctuation."""

    __slots__ = (
        "_agent",
        "_clocks",
        "_metrics",
        "_outputs",
        "_runtime",
        "_txn",
        "index",
        "partition",
        "record",
        "stream_time",
        "timestamp",
    )

    def __init__(
        self,
        txn: TaskTransaction,
        outputs: list[Output],
        partition: int,
        runtime: ContextRuntime,
        clocks: dict[str, TimerClock],
        stream_time: int,
        metrics: list[Report] | None = None,
    ) -> None:
        self._txn = txn
        self._outputs = outputs
        self._metrics: list[Report] = [] if metrics is None else metrics
        self._runtime = runtime
        self._clocks = clocks
        self._agent: Agent | None = None
        #: The task's partition number (the same across every source topic and table).
        self.partition = partition
        #: The input being processed; None in a punctuation, a timer or a window close.
        self.record: ConsumerRecord | None = None
        self.index = 0
        #: Event time of the current input (or the punctuation's / timer's time): the
        #: default timestamp of everything emitted now.
        self.timestamp = -1
        #: The task's stream time: the highest event time its inputs carried so far.
        self.stream_time = stream_time

    def wall_clock_ms(self) -> int:
        """The engine's wall clock (the test driver's controllable one under test): for
        what is wall-clock by nature, such as a command's deadline. Anything a replay must
        reproduce uses event time (`timestamp`, `stream_time`) instead."""
        return self._runtime.wall_clock_ms()

    # ---- state --------------------------------------------------------------------------
    def table(self, name: str) -> TableTransaction:
        agent = self._agent
        if agent is not None and name not in agent.tables:
            raise UndeclaredTable(f"agent {agent.name} did not declare table {name!r}")
        return self._txn.table(name)

    def timers(self, name: str) -> BoundTimers:
        spec, index = self._runtime.timer(self._agent, name)
        return BoundTimers(index, self.table(spec.table), self._clocks[f"t:{name}"])

    def window(self, name: str) -> BoundWindow:
        spec, store = self._runtime.window(self._agent, name)
        return BoundWindow(store, self.table(spec.table), self, self._clocks[f"w:{name}"])

    # ---- output -------------------------------------------------------------------------
    def emit(
        self,
        topic: str,
        schema: str,
        fields: Mapping[str, Any],
        *,
        key: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
        timestamp: int | None = None,
    ) -> None:
        """Queue a record of `schema` built from `fields`, encoded by the topology's one
        serializer; its timestamp defaults to the input's event time."""
        value = self._runtime.serialize(schema, fields)
        self.send(topic, key, value, headers, timestamp)

    def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
        timestamp: int | None = None,
        partition: int | None = None,
    ) -> None:
        """Queue raw bytes (e.g. an input forwarded unchanged to a repartition topic)."""
        ts = self.timestamp if timestamp is None else timestamp
        out = (topic, key, value, headers, self.index, ts if ts >= 0 else None, partition)
        self._outputs.append(out)

    # ---- figures (streams/engine/metrics.py) --------------------------------------------
    def count(self, name: str, *labels: str, n: float = 1) -> None:
        """Add `n` to counter `name` for these label values, once this attempt commits."""
        self._metrics.append((False, name, labels, n))

    def observe(self, name: str, value: float, *labels: str) -> None:
        """Observe `value` in histogram `name` for these label values, once committed."""
        self._metrics.append((True, name, labels, value))

    def dead_letter(
        self,
        kind: str,
        reason: str,
        attempts: int = 1,
        error_class: str | None = None,
        *,
        first_failed_at: int | None = None,
    ) -> None:
        """Send the current input's original key, bytes and headers to the dead-letter
        topic, with why (docs/dlq.md#headers). `error_class` (`transient`, `unknown`,
        `permanent`) says whether a redrive may succeed; None derives it from `kind`.
        `first_failed_at`: an earlier failure of this input (the engine's poison records)."""
        r = self.record
        if r is None:
            raise RuntimeError("dead_letter needs an input record (use review in a timer)")
        letter = DeadLetter(kind, self._runtime.redact(reason), r.topic, r.partition, r.offset,
                            attempts, error_class, tuple(r.headers or ()),
                            self._runtime.wall_clock_ms(), first_failed_at)  # fmt: skip
        self.send(self._runtime.dlq_topic, r.key, r.value, letter.headers())
        self.count(DEAD_LETTERS, kind)

    def review(
        self,
        kind: str,
        reason: str,
        key: bytes,
        value: bytes,
        source: str,
        error_class: str | None = None,
        *,
        resume_topic: str | None = None,
        history: tuple[tuple[str, bytes], ...] = (),
    ) -> None:
        """A dead-letter record for manual review, about state rather than about the input
        being processed (a timer's, or a decision an answer led to).

        Its offset is -1: there is no input to re-inject. Without `resume_topic`,
        `paysaga dlq redrive` leaves it to a human; with one, `value` is an input that takes
        the reviewed work up again, and a redrive sends it there (docs/dlq.md#headers).
        `history`: the `paysaga.redrive.*` headers of an earlier redrive this review
        continues, carried forward like a redriven input's, so the redrive cap counts it."""
        letter = DeadLetter(kind, self._runtime.redact(reason), source, self.partition, -1, 1,
                            error_class, history, self._runtime.wall_clock_ms(),
                            resume_topic=resume_topic)  # fmt: skip
        self.send(self._runtime.dlq_topic, key, value, letter.headers())
        self.count(DEAD_LETTERS, kind)


class ContextRuntime:
    """What every context of one engine shares: the serializer, the DLQ, the indexes."""

    def __init__(
        self,
        serialize: Serializer,
        dlq_topic: str,
        redact: Callable[[str], str],
        timers: dict[str, tuple[Timer, KeyedTimers]],
        windows: dict[str, tuple[WindowSpec, WindowStore]],
        owners: dict[str, str],
    ) -> None:
        self.serialize = serialize
        self.dlq_topic = dlq_topic
        self.redact = redact
        self._timers = timers
        self._windows = windows
        self._owners = owners  # "t:name" / "w:name" -> the declaring agent's name
        #: One `TimerClock` per timer and window index, per task.
        self.clock_names = tuple(owners)
        #: Set by the runner to its clock (the system's, or the test driver's).
        self.wall_clock_ms: Callable[[], int] = lambda: int(time.time() * 1000)

    def _check(self, agent: Agent | None, ref: str) -> None:
        owner = self._owners.get(ref)
        if owner is None or (agent is not None and agent.name != owner):
            who = "this topology" if agent is None else f"agent {agent.name}"
            raise UndeclaredTable(f"{who} did not declare {ref}")

    def timer(self, agent: Agent | None, name: str) -> tuple[Timer, KeyedTimers]:
        self._check(agent, f"t:{name}")
        return self._timers[name]

    def window(self, agent: Agent | None, name: str) -> tuple[WindowSpec, WindowStore]:
        self._check(agent, f"w:{name}")
        return self._windows[name]
