"""The task manager: which tasks this worker runs, opening, rebuilding and retiring them.

Kafka Streams' TaskManager (docs/exactly-once.md#rebalance). The group's assignment
decides what is ours; tasks are opened after aiokafka's rebalance callback, beside the
fetch loop (the callback sends no heartbeats, so a long restore inside it would cost the
worker its membership); a task that cannot go on is rebuilt from committed state; a fenced
one is dropped and the worker rejoins (docs/exactly-once.md#retry-rebuild-or-rejoin).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition

from paysaga.streams.engine.config import StartAt
from paysaga.streams.engine.recovery import Recovery, shut
from paysaga.streams.engine.state import EngineState
from paysaga.streams.engine.task import Task, parse_stream_time

log = logging.getLogger(__name__)


class PositionError(ValueError):
    """A configured start position does not exist in its partition."""


class TaskManager:
    def __init__(self, state: EngineState, recovery: Recovery) -> None:
        self.state = state
        self.recovery = recovery
        self.admin: AIOKafkaAdminClient | None = None
        self._repair_at = 0.0
        self._repair_delay = 0.1
        #: The rebuild in flight, if any (see `repair`); a rebalance cancels it.
        self._repairing: asyncio.Task[None] | None = None
        self._frozen = False

    async def start(self) -> None:
        self.admin = AIOKafkaAdminClient(bootstrap_servers=self.state.config.bootstrap)
        await self.admin.start()

    async def stop(self) -> None:
        if self.admin is not None:
            await self.admin.close()

    # ---- the group's decisions ----------------------------------------------------------
    async def release(self, partitions: set[int]) -> None:
        s = self.state
        await self.cancel_repair()
        async with s.lock:
            s.generation += 1
            s.owned -= partitions
            s.opening -= partitions
            s.assigned = False  # until the next assignment: a rebalance is under way
            for p in partitions:
                await self.retire(p)
                s.broken.pop(p, None)  # after the runner: it may have marked it broken

    async def acquire(self, partitions: set[int]) -> None:
        """Take the assigned partition numbers; their tasks are opened after the callback
        (paused until each is restored and sought to committed)."""
        s = self.state
        await self.cancel_repair()
        async with s.lock:
            s.rejoin = None  # a new assignment is what a rejoin was waiting for
            s.owned |= partitions
            # aiokafka's rebalance is eager: `release` retired every task first, so each
            # assigned task is opened afresh.
            s.opening |= partitions
            for p in partitions:
                s.pause(p)
            s.generation += 1  # batches fetched before this point are stale
            s.assigned = True
            if s.opening:
                self.start_repair()

    # ---- broken tasks and rebuilds ------------------------------------------------------
    def mark_broken(self, p: int, exc: BaseException) -> None:
        """Leave partition number `p` to `repair`: paused, not ready, opened again later."""
        reason = f"{type(exc).__name__}: {exc}"[:300]
        log.error("task %s cannot run (%s); it will be opened again", p, reason)
        self.state.broken[p] = reason
        self.state.opening.discard(p)
        self._repair_at = min(self._repair_at, time.monotonic() + self._repair_delay)
        self.state.pause(p)

    def repair_due(self) -> bool:
        s = self.state
        return bool(s.broken or s.opening) and s.assigned and time.monotonic() >= self._repair_at

    def start_repair(self) -> None:
        """Start rebuilding the broken tasks in the background, when not under way."""
        if self._repairing is None or self._repairing.done():
            self._repairing = asyncio.ensure_future(self.repair())

    async def cancel_repair(self) -> None:
        """Stop a rebuild in flight (its half-opened task is closed): the assignment that
        follows decides what is opened, and two opens of one task would fence each other."""
        repair = self._repairing
        if repair is not None and not repair.done():
            repair.cancel()
            await asyncio.wait([repair])  # its cleanup ran; our own cancellation still counts

    async def repair(self) -> None:
        """Open every task of the assignment not yet open, and every broken one, from
        committed state, off the fetch loop and off aiokafka's rebalance callback.

        The slow part (starting the producer, which waits for the coordinator to fence the
        old one, and replaying the changelog) runs outside the lock: the other tasks keep
        fetching and committing meanwhile. The lock is taken only to retire the old task and
        to install the new one and seek its partitions to committed. All at once: producer
        starts and restores overlap, so the tasks of an assignment start together.
        """
        s = self.state
        due = sorted(s.opening | set(s.broken))
        results = await asyncio.gather(*(self._reopen(p) for p in due), return_exceptions=True)
        for p, result in zip(due, results, strict=True):
            if isinstance(result, Exception):  # not a failure of the repair: try again later
                self.mark_broken(p, result)
            elif isinstance(result, BaseException):
                raise result
        self._repair_delay = min(self._repair_delay * 2, 5.0) if s.broken else 0.1
        self._repair_at = time.monotonic() + self._repair_delay
        if not self._frozen and s.tasks and not s.opening:
            # Everything allocated by start-up and restore lives as long as the worker: keep
            # it out of the cyclic GC's full collections (tens of ms each, a pause every
            # task's latency pays).
            gc.freeze()
            self._frozen = True

    def _wanted(self, p: int) -> bool:
        """Task `p` is to be opened: assigned, and new to this worker or broken."""
        s = self.state
        return p in s.owned and (p in s.opening or p in s.broken)

    async def _reopen(self, p: int) -> None:
        s = self.state
        async with s.lock:
            if not self._wanted(p):
                s.broken.pop(p, None)  # not ours any more: the owner reads its records
                s.opening.discard(p)
                return
            old = await self.detach(p)
        if old is not None:  # outside the lock: a hung producer may take seconds to stop
            await shut(old)
        task = await self.recovery.open_task(p)  # a rebalance meanwhile cancels this
        installed = False
        try:
            async with s.lock:
                if not self._wanted(p) or p in s.tasks:
                    return  # a rebalance decided about p meanwhile: leave it to that
                s.tasks[p] = task
                installed = True
                try:
                    await self._seek_or_close(p)
                finally:
                    # Records of p fetched before the seek are stale (see the fetch loop).
                    s.installs += 1
                    s.installed_at[p] = s.installs
                rebuilt = s.broken.pop(p, None) is not None
                s.opening.discard(p)
        finally:
            if not installed:  # cancelled before, or not wanted: close what was opened
                await shut(task)
        if rebuilt:
            s.stats["rebuilds"] += 1
            log.info("task %s opened again from committed state", p)
        else:
            log.info("task %s opened", p)

    async def _seek_or_close(self, p: int) -> None:
        """Seek installed task `p`'s input partitions to committed, or close the task."""
        try:
            await self.seek_committed({p})
        except BaseException:
            await self.close_task(p)
            raise

    async def seek_committed(self, partitions: set[int]) -> None:
        """Position every assigned input partition at its committed offset, and restore
        each task's stream time from the metadata committed with those offsets.

        The committed offset is the only position that is true for a new assignment:
        records fetched under an earlier assignment (or left uncommitted by a lost task) are
        read again from there. It also becomes each task's `next_offsets`. A partition with
        no committed offset starts at its configured start position (a replay's) or at the
        beginning.
        """
        s = self.state
        consumer = s.consumer
        assert consumer is not None and self.admin is not None
        mine = s.inputs(partitions)
        if not mine:
            return
        committed = await self.admin.list_consumer_group_offsets(s.config.group, partitions=mine)
        fresh = [tp for tp in mine if committed.get(tp) is None or committed[tp].offset < 0]
        starts = await self._starts(fresh) if fresh else {}
        for tp in mine:
            entry = committed.get(tp)
            start = starts[tp] if entry is None or tp in starts else entry.offset
            task = s.tasks.get(tp.partition)
            if task is not None:
                task.next_offsets[tp] = start
                task.paused = False
                if entry is not None and entry.offset >= 0:
                    task.stream_time = max(task.stream_time, parse_stream_time(entry.metadata))
                task.idle_base = task.stream_time
                stop = s.config.stop.get(tp)
                if stop is not None and start >= stop:
                    task.done.add(tp)
            consumer.seek(tp, start)
            if task is not None and tp in task.done:
                consumer.pause(tp)
            else:
                consumer.resume(tp)

    async def _starts(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        """Start offsets of partitions with nothing committed (configured, or earliest)."""
        consumer = self.state.consumer
        assert consumer is not None
        configured = self.state.config.start
        begin = await consumer.beginning_offsets(tps)
        end = await consumer.end_offsets(tps)
        starts = {tp: begin[tp] for tp in tps}
        by_time = {tp: configured[tp].timestamp_ms for tp in tps
                   if tp in configured and configured[tp].timestamp_ms is not None}  # fmt: skip
        found = await consumer.offsets_for_times(by_time) if by_time else {}
        for tp in tps:
            at: StartAt | None = configured.get(tp)
            if at is None:
                continue
            if at.offset is not None:
                if not begin[tp] <= at.offset <= end[tp]:
                    raise PositionError(f"{tp.topic}[{tp.partition}]: offset {at.offset} is "
                                        f"outside {begin[tp]}..{end[tp]}")  # fmt: skip
                starts[tp] = at.offset
            else:
                hit = found.get(tp)
                starts[tp] = end[tp] if hit is None else hit.offset
        return starts

    # ---- closing ------------------------------------------------------------------------
    async def retire(self, p: int) -> None:
        """Close task `p` once its in-flight batch has committed or aborted."""
        task = await self.detach(p)
        if task is not None:
            await shut(task)

    async def detach(self, p: int) -> Task | None:
        """Take task `p` out once its in-flight batch has committed or aborted; closing it
        (`shut`) is left to the caller, who may do it outside the lock."""
        s = self.state
        task = s.tasks.get(p)
        if task is None:
            return None
        task.closing = True  # queued records are left to the next owner
        task.wake.set()  # a runner waiting out its commit interval stops now
        if task.runner is not None:
            await task.runner
        if s.tasks.get(p) is not task:
            return None  # closed meanwhile (its runner found it fenced)
        del s.tasks[p]
        return task

    async def close_task(self, p: int) -> None:
        task = self.state.tasks.pop(p, None)
        if task is not None:
            await shut(task)

    async def fenced(self, task: Task) -> None:
        """Another producer instance took this task's transactional id: stop, and rejoin.

        Nothing of ours can commit any more. The group, not this worker, decides whether the
        partition is still ours: the task is dropped (its partitions paused, its producer
        and stores closed) and the fetch loop rejoins. Reopening at once could fence the new
        owner in turn.
        """
        s = self.state
        p = task.partition
        log.warning("task %s fenced: its producer was replaced; rejoining the group", p)
        s.stats["fenced"] += 1
        if s.config.replay is not None and s.config.replay.rebuild:
            # A reset's rebuild has the live ids: a worker of the application started.
            s.fatal = (f"task {p} fenced: a producer with the application's transactional "
                       "id started (is a worker running?)")  # fmt: skip
        task.closing = True
        s.rejoin = f"task {p} fenced; rejoining the group"
        if s.tasks.get(p) is task:
            s.pause(p)
            await self.close_task(p)  # never awaits the runner: this may be the runner
