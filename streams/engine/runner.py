"""The task runner: a task's batches, from queued records to a committed transaction.

Per batch (docs/exactly-once.md#one-transaction-per-batch): the records of the task's
input partitions, merged by timestamp, run through their agents with one state transaction;
stream time advances with every input's event time, and whatever it makes due (stream-time
schedules, timers, window closes) runs right after that input, in the same transaction.
Then `commit` makes it all visible at once, or nothing. Failures get retry (a Kafka error:
abort, back off, again from committed state), poison (an agent raised: the batch again,
that record to the DLQ) or a rebuild (anything else: `TaskBroken` and friends reach the
drain loop, which hands the task to the manager).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any, Protocol, cast

from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition

from paysaga.streams.engine.commit import FENCED_ERRORS, abort, commit
from paysaga.streams.engine.journal import Entry, RangeReader
from paysaga.streams.engine.journal import decode as decode_entry
from paysaga.streams.engine.manager import TaskManager
from paysaga.streams.engine.processor import (
    Agent,
    BadRecord,
    Output,
    ProcessorContext,
    PunctuationType,
    Timer,
    WindowSpec,
)
from paysaga.streams.engine.state import EngineState
from paysaga.streams.engine.task import RebuildRefused, Task, TaskBroken
from paysaga.tables.store import StoreError
from paysaga.tables.timers import KeyedTimers
from paysaga.tables.transaction import TableTransaction, TaskTransaction
from paysaga.tables.windows import Window

log = logging.getLogger(__name__)

#: Far beyond any event time: an index found empty needs no scan until something is armed.
NEVER = 1 << 62
#: Windows closed (timers fired) per index scan; scans repeat until one returns fewer.
CLOSE_PAGE = 1000


#: What `_decode` returns for an input it sent to the dead-letter topic.
_SKIP = object()


def _page(scan: Callable[[], Sequence[tuple[Any, Any]]], handle: Callable[..., None]) -> None:
    """Handle what an index scan finds, page by page, until a page comes back short."""
    while True:
        found = scan()
        for entry in found:
            handle(*entry)
        if len(found) < CLOSE_PAGE:
            return


def _or_never(due: int | None) -> int:
    """An index's next due time for its `TimerClock` (NEVER: nothing armed)."""
    return NEVER if due is None else due


class Clock(Protocol):
    """Where the runner reads time: the system (`SystemClock`) or the test driver's."""

    def wall_ms(self) -> int: ...

    def monotonic(self) -> float: ...


class SystemClock:
    """The wall clock and the monotonic clock; the test driver substitutes its own."""

    def wall_ms(self) -> int:
        return int(time.time() * 1000)

    def monotonic(self) -> float:
        return time.monotonic()


class TaskRunner:
    def __init__(
        self, state: EngineState, manager: TaskManager | None, clock: Clock | None = None
    ) -> None:
        self.state = state
        self.manager = manager
        self.clock: Clock = clock or SystemClock()
        #: The wall clock of the batch being run: one value per attempt, recorded in the
        #: journal and given back by a replay (None outside a batch: the clock itself).
        self.now: int | None = None
        state.runtime.wall_clock_ms = self._wall_ms
        #: A replay's readers of the replayed application's records, per task.
        self.readers: dict[int, RangeReader] = {}
        agents = state.topology.agents
        self.routes = state.routes
        self.runtime = state.runtime
        self.tick_topic = state.config.tick_topic
        #: Stream-time work, checked after every input that advanced stream time.
        self.stream_schedules = [(a, s) for a in agents for s in a.schedules
                                 if s.type is PunctuationType.STREAM_TIME]  # fmt: skip
        self.wall_schedules = [(a, s) for a in agents for s in a.schedules
                               if s.type is PunctuationType.WALL_CLOCK]  # fmt: skip
        self.stream_timers = [(a, t) for a in agents for t in a.timers
                              if t.type is PunctuationType.STREAM_TIME]  # fmt: skip
        self.wall_timers = [(a, t) for a in agents for t in a.timers
                            if t.type is PunctuationType.WALL_CLOCK]  # fmt: skip
        self.windows = [(a, w) for a in agents for w in a.windows]
        self.stream_work = bool(self.stream_schedules or self.stream_timers or self.windows)
        #: Whether anything runs on the wall clock (the fetch loop's punctuation). Never in
        #: a replay: its punctuations are the recorded ones, at their recorded places.
        self.has_wall_work = state.config.replay is None and bool(
            self.wall_schedules or self.wall_timers or self.writes_ticks)  # fmt: skip

    @property
    def _rebuilding(self) -> bool:
        """A reset's rebuild (config.py `ReplaySource.rebuild`): what it cannot re-execute
        as recorded stops it, instead of becoming poison or a skipped punctuation."""
        replay = self.state.config.replay
        return replay is not None and replay.rebuild

    def _wall_ms(self) -> int:
        return self.now if self.now is not None else self.clock.wall_ms()

    async def close(self) -> None:
        for reader in self.readers.values():
            await reader.close()
        self.readers.clear()

    @property
    def writes_ticks(self) -> bool:
        """Idle ticks are written by an application that owns its tick topic, in an
        unbounded run: a replay reads the live application's ticks as recorded input."""
        config = self.state.config
        return self.tick_topic is not None and config.write_ticks and not config.stop

    # ---- the drain loop -----------------------------------------------------------------
    async def drain(self, task: Task) -> None:
        """Process a task's queued records (then a due punctuation) until none are left."""
        s = self.state
        try:
            while s.current(task):
                if task.inbox:
                    await self._interval(task)
                    if not s.current(task):
                        break
                    lists = [records for records in task.inbox.values() if records]
                    task.inbox = {}
                    await self._process_task(task, lists)
                    if task.paused and task.queued() <= s.config.max_batch:
                        task.paused = False
                        s.resume(task)
                elif task.tick:
                    task.tick = False
                    await self.process_batch(task, [], tick=True)
                else:
                    break
        except RebuildRefused as exc:
            log.error("task %s: %s", task.partition, exc)
            s.fatal = str(exc)  # the rebuild is over: `paysaga reset` reports it
            task.closing = True
        except Exception as exc:
            # Not a Kafka error the batch loop retries: a failed abort, an aiokafka state
            # assertion, a RocksDB write that failed after the commit, a bug. The task's
            # producer and stores can no longer be trusted: rebuild it from committed state.
            if not s.current(task):
                # Being released (or already replaced): the next owner starts from
                # committed state anyway; nothing to rebuild here.
                log.warning("task %s failed while closing: %r", task.partition, exc)
                return
            log.exception("task %s failed; rebuilding it", task.partition)
            task.closing = True
            assert self.manager is not None
            self.manager.mark_broken(task.partition, exc)

    async def _interval(self, task: Task) -> None:
        """Wait out the rest of the commit interval since the task's last batch started
        (config.py `commit_interval_ms`); the fetch loop keeps queueing records meanwhile,
        and they join this batch. Not when the batch is full, nor in a replay."""
        config = self.state.config
        if config.commit_interval_ms <= 0 or config.replay is not None or task.closing:
            return
        left = task.batch_started + config.commit_interval_ms / 1000 - self.clock.monotonic()
        if left > 0 and task.queued() < config.max_batch:
            task.wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await task.wake.wait()

    def _fresh(self, task: Task, records: list[ConsumerRecord]) -> list[ConsumerRecord]:
        """The records not processed yet, and before the partition's stop (if any)."""
        tp = TopicPartition(records[0].topic, records[0].partition)
        expected = task.next_offsets[tp]
        if records[0].offset < expected:
            records = [r for r in records if r.offset >= expected]
        stop = self.state.config.stop.get(tp)
        if stop is not None and records and records[-1].offset >= stop:
            records = [r for r in records if r.offset < stop]
            task.done.add(tp)
            if self.state.consumer is not None:
                self.state.consumer.pause(tp)  # reached its stop: this partition idles
        return records

    async def _process_task(self, task: Task, lists: list[list[ConsumerRecord]]) -> None:
        lists = [kept for records in lists if (kept := self._fresh(task, records))]
        if not lists:
            return  # only records committed already: no batch, the interval not restarted
        task.batch_started = self.clock.monotonic()
        if self.state.config.replay is not None:
            await self._replay(task, [r for records in lists for r in records])
            return
        # Merge the partitions of the task by timestamp, keeping each partition's order.
        if len(lists) == 1:
            records = lists[0]
        else:
            records = list(heapq.merge(*lists, key=lambda r: r.timestamp))
        if not await self.process_batch(task, records):
            # The broker refused an output and several inputs could have caused it: commit
            # one record per transaction, so the culprit is known and only it is poison.
            for record in records:
                if not self.state.current(task):
                    return
                await self.process_batch(task, [record])

    async def _replay(self, task: Task, entries: list[ConsumerRecord]) -> None:
        """A replay's batch: journal records of the replayed application, each re-executed
        as the transaction it records (streams/engine/journal.py), in order."""
        replay = self.state.config.replay
        assert replay is not None
        reader = self.readers.get(task.partition)
        if reader is None:
            reader = self.readers[task.partition] = RangeReader(self.state.config.bootstrap,
                                                                replay.rename)  # fmt: skip
        for record in entries:
            if not self.state.current(task):
                return
            entry = decode_entry(record.value)
            if entry.ticked is not None:
                await self.process_batch(task, [], tick=True, replay=(entry, record))
                continue
            batch = await reader.batch(entry)
            for topic, part, offset, kind, reason in entry.poison:
                key = (reader.rename.get(topic, topic), part, offset)
                task.poison[key] = (kind, reason, entry.now)
            if not await self.process_batch(task, batch, replay=(entry, record)):
                raise TaskBroken(f"a replayed batch's output was refused (journal offset "
                                 f"{record.offset})")  # fmt: skip

    # ---- one batch, until it commits ----------------------------------------------------
    async def process_batch(
        self, task: Task, records: list[ConsumerRecord], tick: bool = False,
        replay: tuple[Entry, ConsumerRecord] | None = None,
    ) -> bool:  # fmt: skip
        """Process and commit `records` as one transaction, retrying from committed state.

        With `tick`, the batch is a wall-clock punctuation (no records). With `replay`, the
        journal entry it re-executes (its clock, its schedules) and the journal record,
        whose offset is what commits. Returns False when a broker-refused output cannot be
        tied to one input record.
        """
        s = self.state
        p = task.partition
        delay = 0.1
        attempt = 0
        while True:
            attempt += 1
            task.begin_attempt()
            txn = TaskTransaction(task.stores)
            outputs: list[Output] = []
            now = self.clock.wall_ms() if replay is None else replay[0].now
            task.attempt_now, task.attempt_ticked = now, None
            task.attempt_decoded.clear()
            task.attempt_entry = None if replay is None else replay[0]
            self.now = now
            try:
                if tick:
                    only = None if replay is None else replay[0].ticked
                    if not self.run_wall_clock(task, txn, outputs, now, only):
                        return True  # a punctuation bug: logged; the next tick tries again
                    if replay is None and not outputs and not any(True for _ in txn.changed()):
                        task.failure = None  # the timers ran cleanly (and nothing was due)
                        task.attempt_committed(s.metrics)
                        return True
                    stream_time = task.stream_time
                else:
                    ran = await self._run_records(task, txn, outputs, records, now)
                    if ran is None:
                        continue  # an agent raised: that record is now poison; again
                    stream_time = ran
            finally:
                self.now = None
            try:
                progress = None if replay is None else replay[1]
                await commit(s, task, txn, outputs, records, stream_time, progress)
                task.attempt_committed(s.metrics)
                task.failure = None
                return True
            except FENCED_ERRORS:
                assert self.manager is not None
                await self.manager.fenced(task)
                return True
            except KafkaError as exc:
                s.stats["aborts"] += 1
                try:
                    await abort(task)
                except FENCED_ERRORS:
                    assert self.manager is not None
                    await self.manager.fenced(task)
                    return True  # the group decides who processes it again
                culprits = getattr(exc, "paysaga_records", None)
                if culprits and tick:
                    # A timer's output the broker refuses: no input to make poison. Say so
                    # (not ready) and let the next tick try again.
                    log.error("task %s punctuation output refused: %r", p, exc)
                    s.stats["punctuate_errors"] += 1
                    task.failure = f"punctuation: {type(exc).__name__}"
                    return True
                if culprits:
                    if len(culprits) > 1:
                        return False
                    r = records[next(iter(culprits))]
                    reason = f"output refused by the broker: {type(exc).__name__}"
                    at = self.clock.wall_ms()
                    task.poison[(r.topic, r.partition, r.offset)] = ("poison", reason, at)
                    continue
                # Kafka is failing us: accept no further work for this task (readiness goes
                # false), back off and process the same batch again from committed state.
                log.warning("task %s batch attempt %s failed: %r; retrying", p, attempt, exc)
                task.failure = f"{type(exc).__name__} (attempt {attempt})"
                if attempt >= s.config.max_attempts:
                    raise TaskBroken(f"{attempt} attempts failed, last: {exc!r}") from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                if not s.current(task):
                    return True  # given up: uncommitted, so the next owner reads it again

    # ---- records ------------------------------------------------------------------------
    def context(self, task: Task, txn: TaskTransaction, outputs: list[Output]) -> ProcessorContext:
        return ProcessorContext(txn, outputs, task.partition, self.runtime, task.clocks,
                                task.stream_time, task.pending_metrics)  # fmt: skip

    def run_records(
        self, task: Task, txn: TaskTransaction, outputs: list[Output], records: list[ConsumerRecord]
    ) -> int | None:
        """Run the agents over the batch at once (the test driver); see `_run_steps`."""
        steps = self._run_steps(task, txn, outputs, records)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return cast(int | None, done.value)

    async def _run_records(self, task: Task, txn: TaskTransaction, outputs: list[Output],
                           records: list[ConsumerRecord], now: int) -> int | None:  # fmt: skip
        """Run the agents over the batch, giving the event loop a turn every `slice_ms` of
        it: a view, a heartbeat or another task's commit never waits for a whole batch
        (docs/architecture.md#slices). The batch is still one transaction: nothing of it
        is visible before its commit, whatever runs in between."""
        steps = self._run_steps(task, txn, outputs, records)
        self.now = now
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return cast(int | None, done.value)
            self.now = None
            await asyncio.sleep(0)
            self.now = now  # another task's batch may have run meanwhile

    def _run_steps(
        self, task: Task, txn: TaskTransaction, outputs: list[Output], records: list[ConsumerRecord]
    ) -> Generator[None, None, int | None]:
        """Run the agents over the batch, pausing (a `yield`) once a slice of time has
        passed; returns the batch's stream time, or None if something raised (that record
        is marked poison and the batch runs again)."""
        ctx = self.context(task, txn, outputs)
        slice_s = self.state.config.slice_ms / 1000 or float("inf")
        slice_end = time.perf_counter() + slice_s
        stats = self.state.stats
        routes = self.routes
        poison = task.poison
        stream_work = self.stream_work
        done_upto = task.stream_time  # stream time up to which stream-time work has run
        record: ConsumerRecord | None = None
        agent: Agent | None = None
        real_input = False
        try:
            for i, record in enumerate(records):
                if i and time.perf_counter() > slice_end:  # looked at every record
                    yield
                    slice_end = time.perf_counter() + slice_s
                ctx.record = record
                ctx.index = i
                ctx.timestamp = record.timestamp  # until the agent's extractor says otherwise
                if poison:
                    mark = poison.get((record.topic, record.partition, record.offset))
                    if mark is not None:
                        ctx._agent = None
                        ctx.dead_letter(mark[0], mark[1], attempts=2,
                                        first_failed_at=mark[2])  # fmt: skip
                        stats["dead_letters"] += 1
                        continue
                agents = routes.get(record.topic)
                if agents is None:
                    self._tick_input(ctx, record)
                else:
                    real_input = True
                    for agent in agents:
                        ctx._agent = agent
                        value = record if agent.decode is None else self._decode(ctx, agent, task)
                        if value is _SKIP:
                            continue
                        ts = (
                            record.timestamp
                            if agent.event_time is None
                            else agent.event_time(value)
                        )
                        ctx.timestamp = ts
                        if ts > ctx.stream_time:
                            ctx.stream_time = ts
                        agent.process(ctx, value)
                    agent = None
                    task.idle_base = ctx.stream_time
                if stream_work and ctx.stream_time > done_upto:
                    self._stream_time_work(task, ctx, done_upto)
                    done_upto = ctx.stream_time
        except StoreError:
            raise  # the local database failed, not the record: the task is rebuilt
        except Exception as exc:
            assert record is not None
            who = f"agent {agent.name}" if agent is not None else "stream-time work"
            reason = self.state.config.redact(f"{who} raised {type(exc).__name__}: {exc}")[:500]
            if self._rebuilding:
                where = f"{record.topic}[{record.partition}]@{record.offset}"
                raise RebuildRefused(f"{where}, which the live run processed: {reason}") from exc
            log.error("poison record %s[%s]@%s: %s", record.topic, record.partition,
                      record.offset, reason)  # fmt: skip
            at = self.clock.wall_ms()
            poison[(record.topic, record.partition, record.offset)] = ("poison", reason, at)
            stats["aborts"] += 1
            return None
        if real_input:
            task.idle_since = self.clock.monotonic()
        return ctx.stream_time

    def _decode(self, ctx: ProcessorContext, agent: Agent, task: Task) -> object:
        record = ctx.record
        assert record is not None and agent.decode is not None
        try:
            return agent.decode(record)
        except BadRecord as bad:
            where = (record.topic, record.partition, record.offset)
            entry = task.attempt_entry
            if self._rebuilding and entry is not None and entry.decoded is not None and (
                    where not in entry.decoded):  # fmt: skip
                raise RebuildRefused(
                    f"{record.topic}[{record.partition}]@{record.offset}, "
                    f"which the live run decoded: {bad.reason}"
                ) from bad
            ctx.dead_letter(bad.kind, bad.reason)
            self.state.stats["dead_letters"] += 1
            task.attempt_decoded.append(where)
            return _SKIP

    def _tick_input(self, ctx: ProcessorContext, record: ConsumerRecord) -> None:
        """A stream-time tick of the idle policy read back: it advances stream time only."""
        raw = record.value or b""
        if record.topic != self.tick_topic or not raw.isdigit():
            ctx._agent = None
            ctx.dead_letter("decode", f"not a stream-time tick on {record.topic}")
            self.state.stats["dead_letters"] += 1
            return
        ts = int(raw)
        ctx.timestamp = ts
        if ts > ctx.stream_time:
            ctx.stream_time = ts

    # ---- what stream time makes due -----------------------------------------------------
    def _stream_time_work(self, task: Task, ctx: ProcessorContext, before: int) -> None:
        """Run what stream time's move from `before` to `ctx.stream_time` made due: the
        stream-time schedules whose interval boundary it crossed, the due timers and the
        windows past their end plus grace. Inside the input's transaction."""
        now = ctx.stream_time
        record, timestamp = ctx.record, ctx.timestamp
        ctx.record = None  # what runs now was not caused by this input alone
        try:
            for agent, sched in self.stream_schedules:
                if before < 0 or before // sched.interval_ms < now // sched.interval_ms:
                    ctx._agent, ctx.timestamp = agent, now
                    sched.callback(ctx, now)
                    self.state.stats["punctuations"] += 1
            self._fire_timers(task, ctx, self.stream_timers, now)
            for agent, spec in self.windows:
                self._close_windows(task, ctx, agent, spec, now)
        finally:
            ctx.record, ctx.timestamp = record, timestamp

    def _close_windows(
        self, task: Task, ctx: ProcessorContext, agent: Agent, spec: WindowSpec, now: int
    ) -> None:
        _, store = self.runtime.window(agent, spec.name)

        def close(table: TableTransaction, window: Window, value: bytes) -> None:
            ctx.timestamp = window.end - 1
            spec.on_close(ctx, window, value)

        def scan(table: TableTransaction) -> list[tuple[Window, bytes]]:
            return store.close_due(table, now, CLOSE_PAGE)

        self._run_due(task, ctx, agent, f"w:{spec.name}", spec.table, now, scan,
                      store.next_close, close)  # fmt: skip

    def _fire_timers(
        self, task: Task, ctx: ProcessorContext, timers: list[tuple[Agent, Timer]], now: int
    ) -> None:
        for agent, spec in timers:
            if not task.clocks[f"t:{spec.name}"].may_fire(now):
                continue  # the common case, per input: nothing armed is due yet
            _, index = self.runtime.timer(agent, spec.name)

            def fire(table: TableTransaction, due: int, key: bytes, spec: Timer = spec,
                     index: KeyedTimers = index) -> None:  # fmt: skip
                if index.due_of(table, key) != due:
                    return  # moved by a callback of this page (another key's): not due now
                index.cancel(table, key)  # fired: gone unless the callback arms it again
                ctx.timestamp = due
                spec.on_fire(ctx, key, due)

            def scan(
                table: TableTransaction, index: KeyedTimers = index
            ) -> list[tuple[int, bytes]]:
                return index.due(table, now, CLOSE_PAGE)

            self._run_due(task, ctx, agent, f"t:{spec.name}", spec.table, now, scan,
                          index.next_due, fire)  # fmt: skip

    @staticmethod
    def _run_due(
        task: Task,
        ctx: ProcessorContext,
        agent: Agent,
        clock_name: str,
        table_name: str,
        now: int,
        scan: Callable[[TableTransaction], Sequence[tuple[Any, Any]]],
        next_due: Callable[[TableTransaction], int | None],
        handle: Callable[..., None],
    ) -> None:
        """Handle what an index (timers, window closes) holds due at `now`, unless its
        clock says nothing can be; then set the clock to what the index holds next."""
        clock = task.clocks[clock_name]
        if not clock.may_fire(now):
            return
        ctx._agent = agent
        table = ctx.table(table_name)
        _page(lambda: scan(table), lambda *entry: handle(table, *entry))
        clock.earliest = _or_never(next_due(table))

    # ---- the wall clock -----------------------------------------------------------------
    def schedule_ticks(self, now: float | None = None) -> None:
        """Mark wall-clock punctuation due on every task whose interval has passed."""
        if not self.has_wall_work:
            return
        s = self.state
        now = self.clock.monotonic() if now is None else now
        interval = s.config.punctuate_ms / 1000
        for task in s.tasks.values():
            if task.closing or now - task.last_tick < interval:
                continue
            task.tick, task.last_tick = True, now
            if task.runner is None or task.runner.done():
                task.runner = asyncio.ensure_future(self.drain(task))

    def run_wall_clock(self, task: Task, txn: TaskTransaction, outputs: list[Output],
                       now: int | None = None,
                       only: tuple[str, ...] | None = None) -> bool:  # fmt: skip
        """A wall-clock punctuation: due schedules and timers, and the idle policy's tick.
        `only`: a replay's, the schedules the recorded punctuation ran (and no tick)."""
        ctx = self.context(task, txn, outputs)
        wall_ms = self.clock.wall_ms() if now is None else now
        mono = self.clock.monotonic()
        ran = task.attempt_ticked = []
        try:
            for agent, sched in self.wall_schedules:
                if only is not None:
                    if sched.name not in only:
                        continue
                else:
                    last = task.wall_runs.get(sched.name)
                    if last is not None and (mono - last) * 1000 < sched.interval_ms:
                        continue
                task.pending_wall[sched.name] = mono
                ran.append(sched.name)
                ctx._agent, ctx.timestamp = agent, wall_ms
                sched.callback(ctx, wall_ms)
                self.state.stats["punctuations"] += 1
            self._fire_timers(task, ctx, self.wall_timers, wall_ms)
            if only is None:
                self._idle_tick(task, ctx, mono)
        except StoreError:
            raise  # the database, not the timer: the task is rebuilt
        except Exception as exc:
            if self._rebuilding:  # a recorded punctuation skipped would change the state
                reason = self.state.config.redact(f"{type(exc).__name__}: {exc}")[:500]
                which = ", ".join(only or ()) or "its timers"
                raise RebuildRefused(f"a punctuation the live run ran ({which})"
                                     f" raised {reason}") from exc  # fmt: skip
            log.exception("punctuation failed on task %s", task.partition)
            self.state.stats["punctuate_errors"] += 1
            task.failure = f"punctuation: {type(exc).__name__}"
            return False
        return True

    def _idle_tick(self, task: Task, ctx: ProcessorContext, mono: float) -> None:
        """The idle policy (docs/exactly-once.md#idle-partitions): once a task has seen no
        input for `idle_ms`, its stream time follows the wall clock from where it stood,
        `idle_ms` behind. The move is written to the tick topic and read back as input, so
        it is part of the recorded stream: a replay reproduces it exactly."""
        config = self.state.config
        if not self.writes_ticks or task.idle_base < 0:
            return
        idle = (mono - task.idle_since) * 1000
        if idle < config.idle_ms or (mono - task.last_tick_write) * 1000 < config.idle_ms:
            return
        proposed = task.idle_base + int(idle) - config.idle_ms
        if proposed <= task.stream_time:
            return
        assert self.tick_topic is not None
        task.pending_tick_write = mono
        ctx._agent = None
        ctx.send(self.tick_topic, None, str(proposed).encode(), None, proposed, task.partition)
        self.state.stats["ticks"] += 1
