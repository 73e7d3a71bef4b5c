"""paysaga's exactly-once processing engine, beneath the agents.

Why it exists (DESIGN.md section 10): Faust's own `exactly_once` routes outputs to topics
its consumer does not read through a NON-transactional producer (faust-streaming #177),
commits on a timer that cuts through the agent's work, and does not flush changelog records
before committing. Here a worker runs as a Faust app (web views, lifecycle, services) and
this engine, a service of that worker, owns consumption:

- A *task* is one partition number p across every source topic and every table (all are
  co-partitioned; the range assignor hands the same p of every topic to one member). Each
  task has one transactional producer, `transactional.id = <app_id>-task-<p>`: EOS v1
  fencing, so a zombie owner of p can no longer commit once a new owner initialised.
- A batch of a task runs the agents on its records with a state transaction that buffers
  writes and serves reads of its own writes (`tables.transaction`). Then, in ONE Kafka
  transaction: every output record (any topic, any partition), one changelog record per
  changed key, and the input offsets; the commit happens after every send was acknowledged.
  Only after the commit are the writes applied to RocksDB, together with the changelog
  offset they reflect. A crash at any point leaves the store at or behind the committed
  changelog, and recovery replays the difference; a store ahead of its changelog is wiped.
- An exception in an agent marks that input record as poison; the batch is processed again
  from the committed state, the poison record going to the DLQ instead of looping. A failed
  send or commit aborts the transaction and the batch is processed again; a record whose
  own output the broker refuses becomes poison too.
- A rebalance waits for the in-flight batch (commit or abort) before giving partitions up.
  A new assignment's tasks are opened (producer started, stores restored) after aiokafka's
  rebalance callback, beside the fetch loop, so heartbeats go on through a long restore.
- Failures get one of three answers, and `/ready/` says which task is failing meanwhile:
  *retry* (a Kafka error: abort, back off, process the batch again), *rebuild* (anything
  else inside a task, e.g. a failed abort, a producer in an unusable state, a RocksDB write
  that failed after the commit, or a task that could not be opened after an assignment: the task
  is closed and opened again from committed state, beside the fetch loop so the other
  tasks go on, with backoff while that fails), and
  *rejoin* (the task's producer was fenced: the task is dropped and the worker rejoins the
  group, which decides who owns it now; a task fenced while still ours comes back).
- Punctuators (Kafka Streams' punctuation) run per task every `punctuate_ms` of wall clock,
  in a batch of their own with the same transaction rules: timers read and write tables
  and send records exactly like agents, only without an input offset to commit.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import heapq
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import mode
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    MessageSizeTooLargeError,
    ProducerFenced,
    RecordTooLargeError,
)
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata, TopicPartition

from paysaga.streams.engine.deadletter import DeadLetter
from paysaga.streams.engine.partitioner import partition_for
from paysaga.tables.store import PartitionStore, StoreError, StoreManager
from paysaga.tables.transaction import TableTransaction, TaskTransaction

log = logging.getLogger(__name__)

#: Broker answers that concern one record, not the transaction: its input becomes poison.
RECORD_ERRORS = (MessageSizeTooLargeError, RecordTooLargeError)
#: The task now belongs to another producer instance: drop it, never commit again.
FENCED_ERRORS = (ProducerFenced, InvalidProducerEpoch)


#: Producer stops that outlived their deadline (see `_stop_producer`). asyncio holds only
#: weak references to tasks: without this one could be collected half-way.
_STOPPING: set[asyncio.Future] = set()


def _stopped(p: int, stopping: asyncio.Future) -> None:
    _STOPPING.discard(stopping)
    if not stopping.cancelled() and stopping.exception() is not None:
        log.warning("task %s producer stop: %r", p, stopping.exception())


class TaskBroken(Exception):
    """The task cannot go on with what it has: close it and open it again (see `_repair`)."""


@dataclass(frozen=True)
class AgentSpec:
    """One agent: what it reads, which tables it uses, and its per-record function."""

    name: str
    source: str
    process: Callable[[Context, ConsumerRecord], None]
    tables: tuple[str, ...] = ()


#: A timer callback: `(context, wall-clock epoch ms)`, run per task (see the docstring).
Punctuator = Callable[["Context", int], None]


@dataclass
class EngineConfig:
    bootstrap: str
    app_id: str
    dlq_topic: str
    changelog: Callable[[str], str]
    max_batch: int = 2000
    linger_ms: int = 0
    poll_timeout_ms: int = 100
    #: How long the broker may hold a fetch waiting for data. aiokafka's default (500 ms)
    #: adds up to half a second of latency per hop when traffic is light.
    fetch_max_wait_ms: int = 5
    #: How often each task's punctuators run (wall clock).
    punctuate_ms: int = 500
    #: Consecutive failed attempts at one batch after which the task is rebuilt (a fresh
    #: producer: a refused record can leave the old one's sequence numbers unusable).
    max_attempts: int = 5
    #: A crashed worker's partitions wait this long before the group hands them on (and a
    #: restarted worker waits as long to join while its dead self is still a member).
    session_timeout_ms: int = 10_000
    #: Applied to every dead-letter reason (the application's scrubber of sensitive text).
    redact: Callable[[str], str] = str


class Context:
    """What an agent sees while it processes one record: tables, sends, dead letters."""

    __slots__ = ("_outputs", "_txn", "index", "partition", "record", "redact")

    def __init__(self, txn: TaskTransaction, outputs: list, partition: int = 0,
                 redact: Callable[[str], str] = str) -> None:  # fmt: skip
        self.redact = redact
        self._txn = txn
        self._outputs = outputs
        self.record: ConsumerRecord | None = None
        self.index = 0
        #: The task's partition number (the same across every source topic and table).
        self.partition = partition

    def table(self, name: str) -> TableTransaction:
        return self._txn.table(name)

    def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        """Queue an output; it is produced inside this batch's transaction."""
        self._outputs.append((topic, key, value, headers, self.index))

    def dead_letter(self, kind: str, reason: str, dlq_topic: str, attempts: int = 1) -> None:
        r = self.record
        assert r is not None
        letter = DeadLetter(kind, self.redact(reason), r.topic, r.partition, r.offset, attempts)
        self.send(dlq_topic, r.key, r.value, letter.headers())

    def review(self, kind: str, reason: str, dlq_topic: str, key: bytes, value: bytes,
               source: str) -> None:  # fmt: skip
        """A DLQ record for manual review that no single input record caused (a timer's)."""
        letter = DeadLetter(kind, self.redact(reason), source, self.partition, -1, 1)
        self.send(dlq_topic, key, value, letter.headers())


@dataclass
class Task:
    """One partition number's producer, stores and poison list."""

    partition: int
    producer: AIOKafkaProducer
    stores: dict[str, PartitionStore]
    poison: dict[tuple[str, int, int], tuple[str, str]] = field(default_factory=dict)
    #: Next offset to process per input partition: the committed offset at assignment,
    #: then advanced by every commit. Records below it were already committed here (a
    #: fetch made before a seek can deliver them again) and are never processed twice.
    next_offsets: dict[TopicPartition, int] = field(default_factory=dict)
    committed_batches: int = 0
    #: Fetched records waiting for this task's next batch, per input partition, in order.
    inbox: dict[TopicPartition, list[ConsumerRecord]] = field(default_factory=dict)
    runner: asyncio.Future | None = None
    closing: bool = False
    #: Why this task's last attempt failed (None once a batch committed again).
    failure: str | None = None
    #: Its input partitions are paused because it has too much queued (backpressure).
    paused: bool = False
    #: Wall-clock time (monotonic) of the last punctuation, and whether one is due.
    last_tick: float = 0.0
    tick: bool = False

    def queued(self) -> int:
        return sum(len(records) for records in self.inbox.values())


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, engine: ExactlyOnceEngine) -> None:
        self.engine = engine

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self.engine.release({tp.partition for tp in revoked})

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self.engine.acquire({tp.partition for tp in assigned})


class ExactlyOnceEngine(mode.Service):
    """Consume, process and produce with exactly-once semantics (see module docstring)."""

    def __init__(
        self,
        config: EngineConfig,
        agents: list[AgentSpec],
        stores: StoreManager,
        tables: tuple[str, ...],
        punctuators: tuple[Punctuator, ...] = (),
        **kwargs: Any,
    ) -> None:
        self.config = config
        self.agents = {a.source: a for a in agents}
        self.punctuators = punctuators
        self.store_manager = stores
        self.table_names = tables
        self.tasks: dict[int, Task] = {}
        self._lock = asyncio.Lock()
        #: Bumped by every assignment change; a batch fetched under an older generation is
        #: discarded whole, because its positions were reset by the seek to committed.
        self._generation = 0
        #: Bumped by every rebuild's install; `_installed_at[p]` is its value when task p
        #: was last installed. Only that partition's records fetched before are stale:
        #: the other tasks keep theirs (discarding them would skip records for good).
        self._installs = 0
        self._installed_at: dict[int, int] = {}
        self._partition_counts: dict[str, int] = {}
        self.consumer: AIOKafkaConsumer | None = None
        self.assigned = False
        #: Assigned partition numbers whose task is being opened (restored) after the
        #: assignment, off aiokafka's callback (see `acquire`).
        self.opening: set[int] = set()
        #: The fetch loop died: nothing is consumed any more (the worker must be restarted).
        self.fatal: str | None = None
        #: Assigned partition numbers whose task is not open, and why (see `_repair`).
        self.broken: dict[int, str] = {}
        #: Partition numbers the group gave us (acquire adds, release removes). Repairs use
        #: it, not `consumer.assignment()`, which still lists revoked partitions until
        #: aiokafka applies the next assignment.
        self.owned: set[int] = set()
        self._repair_at = 0.0
        self._repair_delay = 0.1
        #: The rebuild in flight, if any (see `_repair`); a rebalance cancels it.
        self._repairing: asyncio.Task | None = None
        #: Set when a task was fenced: the fetch loop makes the worker rejoin the group.
        self._rejoin: str | None = None
        self._frozen = False
        #: Restores running now, and since when (see `_restore_begins`).
        self._restores = 0
        self._restore_since = 0.0
        self.stats: dict[str, float] = {
            "records": 0, "batches": 0, "aborts": 0, "dead_letters": 0, "restored": 0,
            "restore_seconds": 0.0, "send_seconds": 0.0, "offsets_seconds": 0.0,
            "commit_seconds": 0.0, "punctuations": 0, "punctuate_errors": 0, "refetches": 0,
            "rebuilds": 0, "fenced": 0, "rejoins": 0,
        }  # fmt: skip
        super().__init__(**kwargs)

    # ---- lifecycle --------------------------------------------------------------------------
    async def on_start(self) -> None:
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.config.bootstrap,
            group_id=self.config.app_id,
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            partition_assignment_strategy=(RangePartitionAssignor,),
            fetch_max_wait_ms=self.config.fetch_max_wait_ms,
            max_poll_interval_ms=600_000,
            session_timeout_ms=self.config.session_timeout_ms,
            heartbeat_interval_ms=self.config.session_timeout_ms // 3,
            # How long the group waits for a member's revocation (in-flight batches commit
            # or abort, producers stop) before rebalancing without it. aiokafka defaults it
            # to the session timeout, which a release under load can outlast.
            rebalance_timeout_ms=max(60_000, self.config.session_timeout_ms),
        )
        self.consumer.subscribe(sorted(self.agents), listener=_Rebalance(self))
        await self.consumer.start()
        self.add_future(self._run())

    async def on_stop(self) -> None:
        # In-flight batches commit or abort first; opens and rebuilds under way are cancelled.
        await self.release(self.owned | set(self.tasks))
        if self.consumer is not None:
            await self.consumer.stop()

    @property
    def failed(self) -> str | None:
        """Why the worker is not healthy right now (None when every task is fine)."""
        if self.fatal is not None:
            return self.fatal
        if self._rejoin is not None:
            return self._rejoin
        if self.broken:
            p = min(self.broken)
            return f"task {p}: {self.broken[p]}"
        failing = sorted(p for p, task in self.tasks.items() if task.failure is not None)
        return f"task {failing[0]}: {self.tasks[failing[0]].failure}" if failing else None

    @property
    def recovering(self) -> bool:
        """Tasks of the current assignment are still being opened and restored."""
        return bool(self.opening)

    @property
    def ready(self) -> bool:
        return self.assigned and not self.recovering and self.failed is None

    def store(self, table: str, partition: int) -> PartitionStore | None:
        task = self.tasks.get(partition)
        return None if task is None else task.stores.get(table)

    # ---- rebalancing ------------------------------------------------------------------------
    async def release(self, partitions: set[int]) -> None:
        await self._cancel_repair()
        async with self._lock:
            self._generation += 1
            self.owned -= partitions
            self.opening -= partitions
            self.assigned = False  # until the next assignment: a rebalance is under way
            for p in partitions:
                await self._retire(p)
                self.broken.pop(p, None)  # after the runner: it may have marked it broken

    async def acquire(self, partitions: set[int]) -> None:
        """Take the assigned partition numbers; their tasks are opened after the callback.

        aiokafka sends no heartbeats while this callback runs, so it must be short: a
        restore that outlasted the session timeout would cost the worker its membership.
        The partitions are paused and `_repair` opens each task beside the fetch loop (start
        its producer, restore its stores, install it and seek it to committed), as Kafka
        Streams and Faust restore outside the rebalance. `/ready/` says recovering until
        every task is open. The callback also swallows exceptions: nothing may escape.
        """
        await self._cancel_repair()
        async with self._lock:
            self._rejoin = None  # a new assignment is what a rejoin was waiting for
            self.owned |= partitions
            # aiokafka's rebalance is eager: `release` retired every task first, so each
            # assigned task is opened afresh.
            self.opening |= partitions
            for p in partitions:
                self._pause(p)
            self._generation += 1  # batches fetched before this point are stale
            self.assigned = True
            if self.opening:
                self._start_repair()

    async def _seek_or_close(self, p: int) -> None:
        """Seek installed task `p`'s input partitions to committed, or close the task."""
        try:
            await self._seek_committed({p})
        except BaseException:
            await self._close_task(p)
            raise

    def _mark_broken(self, p: int, exc: BaseException) -> None:
        """Leave partition number `p` to `_repair`: paused, not ready, opened again later."""
        reason = f"{type(exc).__name__}: {exc}"[:300]
        log.error("task %s cannot run (%s); it will be opened again", p, reason)
        self.broken[p] = reason
        self.opening.discard(p)
        self._repair_at = min(self._repair_at, time.monotonic() + self._repair_delay)
        self._pause(p)

    def _inputs(self, partitions: set[int]) -> list[TopicPartition]:
        """The assigned input partitions of these task numbers."""
        consumer = self.consumer
        assert consumer is not None
        return [tp for tp in consumer.assignment() if tp.partition in partitions]

    def _pause(self, p: int) -> None:
        if self.consumer is not None:
            self.consumer.pause(*self._inputs({p}))

    def _resume(self, task: Task) -> None:
        if self.consumer is not None and self.tasks.get(task.partition) is task:
            self.consumer.resume(*self._inputs({task.partition}))

    def _start_repair(self) -> None:
        """Start rebuilding the broken tasks in the background, when due and not under way."""
        if self._repairing is None or self._repairing.done():
            self._repairing = asyncio.ensure_future(self._repair())

    async def _cancel_repair(self) -> None:
        """Stop a rebuild in flight (its half-opened task is closed): the assignment that
        follows decides what is opened, and two opens of one task would fence each other."""
        repair = self._repairing
        if repair is not None and not repair.done():
            repair.cancel()
            await asyncio.wait([repair])  # its cleanup ran; our own cancellation still counts

    async def _repair(self) -> None:
        """Open every task of the assignment not yet open, and every broken one, from
        committed state, off the fetch loop and off aiokafka's rebalance callback.

        The slow part, starting the producer (which waits for the coordinator to fence the
        old one) and replaying the changelog, runs outside the lock: the other tasks keep
        fetching and committing meanwhile. The lock is taken only to retire the old task and
        to install the new one and seek its partitions to committed.
        """
        # All at once: producer starts (coordinator round trips) and restores overlap, so
        # the tasks of an assignment start processing together.
        due = sorted(self.opening | set(self.broken))
        results = await asyncio.gather(*(self._reopen(p) for p in due), return_exceptions=True)
        for p, result in zip(due, results, strict=True):
            if isinstance(result, Exception):  # not a failure of the repair: try again later
                self._mark_broken(p, result)
            elif isinstance(result, BaseException):
                raise result
        if self.broken:
            self._repair_delay = min(self._repair_delay * 2, 5.0)
        else:
            self._repair_delay = 0.1
        self._repair_at = time.monotonic() + self._repair_delay
        if not self._frozen and self.tasks and not self.opening:
            # Everything allocated by start-up and restore lives as long as the worker: keep
            # it out of the cyclic GC's full collections (tens of ms each, a pause every
            # task's latency pays).
            gc.freeze()
            self._frozen = True

    def _wanted(self, p: int) -> bool:
        """Task `p` is to be opened: assigned, and new to this worker or broken."""
        return p in self.owned and (p in self.opening or p in self.broken)

    async def _reopen(self, p: int) -> None:
        async with self._lock:
            if not self._wanted(p):
                self.broken.pop(p, None)  # not ours any more: the owner reads its records
                self.opening.discard(p)
                return
            old = await self._detach(p)
        if old is not None:  # outside the lock: a hung producer may take seconds to stop
            await self._shut(old)
        task = await self._open_task(p)  # a rebalance meanwhile cancels this (see release)
        installed = False
        try:
            async with self._lock:
                if not self._wanted(p) or p in self.tasks:
                    return  # a rebalance decided about p meanwhile: leave it to that
                self.tasks[p] = task
                installed = True
                try:
                    await self._seek_or_close(p)
                finally:
                    # Records of p fetched before the seek are stale (see `_fetch_loop`).
                    self._installs += 1
                    self._installed_at[p] = self._installs
                rebuilt = self.broken.pop(p, None) is not None
                self.opening.discard(p)
        finally:
            if not installed:  # cancelled before, or not wanted: close what was opened
                await self._shut(task)
        if rebuilt:
            self.stats["rebuilds"] += 1
            log.info("task %s opened again from committed state", p)
        else:
            log.info("task %s opened", p)

    async def _seek_committed(self, partitions: set[int]) -> None:
        """Position every assigned input partition at its committed offset.

        The committed offset is the only position that is true for a new assignment:
        records fetched under an earlier assignment (or left uncommitted by a lost task) are
        read again from there. It also becomes each task's `next_offsets`.
        """
        consumer = self.consumer
        assert consumer is not None
        mine = self._inputs(partitions)
        if not mine:
            return
        consumer.resume(*mine)
        beginnings = await consumer.beginning_offsets(mine)
        for tp in mine:
            committed = await consumer.committed(tp)
            start = beginnings[tp] if committed is None else committed
            consumer.seek(tp, start)
            task = self.tasks.get(tp.partition)
            if task is not None:
                task.next_offsets[tp] = start
                task.paused = False

    async def _open_task(self, p: int) -> Task:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.config.bootstrap,
            transactional_id=f"{self.config.app_id}-task-{p}",
            enable_idempotence=True,
            acks="all",
            linger_ms=self.config.linger_ms,
            max_batch_size=256 * 1024,
            # A transaction's first request often meets CONCURRENT_TRANSACTIONS while the
            # last one's markers are written (see `_commit`); aiokafka's default 100 ms
            # backoff would then show up directly in end-to-end latency.
            retry_backoff_ms=10,
        )
        # start() returns once InitProducerId succeeded, and the coordinator answers it only
        # after any previous owner's transaction is complete (an open one aborted, a
        # committing one's markers written): that owner is fenced, and the restore below,
        # which reads up to the last stable offset, sees every batch it committed.
        stores: dict[str, PartitionStore] = {}
        try:
            await producer.start()
            for table in self.table_names:
                stores[table] = await self._recover(table, p)
        except BaseException:
            for store in stores.values():
                store.close()
            await self._stop_producer(p, producer)
            raise
        return Task(p, producer, stores)

    async def _retire(self, p: int) -> None:
        """Close task `p` once its in-flight batch has committed or aborted."""
        task = await self._detach(p)
        if task is not None:
            await self._shut(task)

    async def _detach(self, p: int) -> Task | None:
        """Take task `p` out once its in-flight batch has committed or aborted; closing it
        (`_shut`) is left to the caller, who may do it outside the lock."""
        task = self.tasks.get(p)
        if task is None:
            return None
        task.closing = True  # queued records are left to the next owner
        if task.runner is not None:
            await task.runner
        if self.tasks.get(p) is not task:
            return None  # closed meanwhile (its runner found it fenced)
        del self.tasks[p]
        return task

    async def _close_task(self, p: int) -> None:
        task = self.tasks.pop(p, None)
        if task is not None:
            await self._shut(task)

    async def _shut(self, task: Task) -> None:
        """Close a task that is not (or no longer) installed: its stores, then its producer."""
        for store in task.stores.values():
            store.close()
        await self._stop_producer(task.partition, task.producer)

    @staticmethod
    async def _stop_producer(p: int, producer: AIOKafkaProducer, timeout: float = 10.0) -> None:
        """Stop a task's producer without letting a hung one hold up the engine.

        A fenced or broken producer may fail to stop, and one whose broker stopped answering
        waits to flush its unsent records, retrying for as long as the outage lasts. Those
        records belong to a transaction that is never committed (and the task's next
        producer fences this one), so nothing waits for them: after `timeout` the stop goes
        on in the background and ends once the broker answers again. Cancelling it instead
        would leave the producer's sender task and connections behind for good.
        """
        stopping = asyncio.ensure_future(producer.stop())
        _STOPPING.add(stopping)
        stopping.add_done_callback(functools.partial(_stopped, p))
        done, _ = await asyncio.wait([stopping], timeout=timeout)
        if not done:
            log.warning("task %s producer did not stop in %s s; it goes on stopping in the "
                        "background", p, timeout)  # fmt: skip

    def _restore_begins(self) -> None:
        """Count wall-clock time while any restore runs (`restore_seconds`): restores of an
        assignment overlap, and summing each one's time would understate the rate."""
        if self._restores == 0:
            self._restore_since = time.monotonic()
        self._restores += 1

    def _restore_ends(self) -> None:
        self._restores -= 1
        if self._restores == 0:
            self.stats["restore_seconds"] += time.monotonic() - self._restore_since

    async def _recover(self, table: str, p: int) -> PartitionStore:
        """Open the store and replay its changelog from the offset it reflects to the end."""
        store = self.store_manager.open(table, p)
        tp = TopicPartition(self.config.changelog(table), p)
        reader = AIOKafkaConsumer(
            bootstrap_servers=self.config.bootstrap,
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=8 * 1024 * 1024,
        )
        try:
            await reader.start()
            reader.assign([tp])
            end = (await reader.end_offsets([tp]))[tp]
            applied = store.changelog_offset()
            if applied is not None and applied >= end:
                # Local state claims more than the committed changelog holds (the topic was
                # recreated, or state came from elsewhere): it cannot be trusted.
                log.warning("%s[%s]: local state ahead of changelog; rebuilding", table, p)
                store.close()
                self.store_manager.wipe(table, p)
                store = self.store_manager.open(table, p)
                applied = None
            # Explicit offsets: aiokafka's seek_to_beginning right after assign() can lose
            # to the initial reset and land at the end (seen with auto_offset_reset=latest).
            if applied is None:
                reader.seek(tp, (await reader.beginning_offsets([tp]))[tp])
            else:
                reader.seek(tp, applied + 1)
            start = await reader.position(tp)
            restored = 0
            self._restore_begins()
            try:
                while await reader.position(tp) < end:
                    batch = await reader.getmany(tp, timeout_ms=50, max_records=20_000)
                    records = batch.get(tp, [])
                    if records:
                        store.apply({r.key: r.value for r in records}, records[-1].offset)
                        self.stats["restored"] += len(records)
                        restored += len(records)
            finally:
                self._restore_ends()
            log.info("%s[%s]: restored %d changelog records (%d..%d)", table, p, restored,
                     start, end)  # fmt: skip
            return store
        except BaseException:
            store.close()  # release the RocksDB lock now: a repair reopens it
            raise
        finally:
            await reader.stop()

    # ---- processing -------------------------------------------------------------------------
    async def _run(self) -> None:
        """Fetch and hand records to the tasks; each task commits on its own schedule.

        A task starts its next batch as soon as its previous transaction committed, so one
        slow commit does not hold back the other partitions. Fetching pauses while the
        tasks have more than a few batches queued.
        """
        try:
            await self._fetch_loop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never die silently: report not-ready and say why
            log.exception("fetch loop failed")
            self.fatal = f"fetch loop: {type(exc).__name__}: {exc}"
            raise

    async def _fetch_loop(self) -> None:
        consumer = self.consumer
        assert consumer is not None
        limit = 2 * self.config.max_batch
        while not self.should_stop:
            if self._rejoin is not None and self.assigned:
                self._force_rejoin()
            # Tasks to open, when due; never between a release and the next assignment.
            pending = self.broken or self.opening
            if pending and self.assigned and time.monotonic() >= self._repair_at:
                self._start_repair()
            generation = self._generation
            installs = self._installs
            batch = await consumer.getmany(
                timeout_ms=self.config.poll_timeout_ms, max_records=self.config.max_batch
            )
            if not batch:
                if self.punctuators:
                    async with self._lock:
                        self._schedule_ticks()
                continue
            async with self._lock:  # never interleave with an assignment change
                if generation != self._generation:
                    self._refetch(batch)
                    continue
                if installs != self._installs:  # a rebuilt task was sought meanwhile
                    batch = self._refetch_installed(batch, installs)
                for tp, records in batch.items():
                    task = self.tasks.get(tp.partition)
                    if task is None or task.closing or tp not in task.next_offsets:
                        continue  # not ours any more: the next owner reads them
                    task.inbox.setdefault(tp, []).extend(records)
                    if not task.paused and task.queued() > limit:
                        # Backpressure per task: a slow or retrying task stops fetching for
                        # itself only; `_drain` resumes it once it has caught up.
                        self._pause(task.partition)
                        task.paused = True
                    if task.runner is None or task.runner.done():
                        task.runner = asyncio.ensure_future(self._drain(task))
                self._schedule_ticks()

    def _force_rejoin(self) -> None:
        """Make the group assign partitions again (after a task's producer was fenced).

        Subscribing again is aiokafka's public way to rejoin: every task is released (its
        in-flight batch commits or aborts) and the assignment decides who owns what. A task
        fenced by a transaction timeout comes back here; one taken over by another worker
        does not.
        """
        consumer = self.consumer
        assert consumer is not None
        log.warning("rejoining the group: %s", self._rejoin)
        self.stats["rejoins"] += 1
        self.assigned = False  # until the new assignment arrives
        consumer.subscribe(sorted(self.agents), listener=_Rebalance(self))

    def _refetch(self, batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        """Discard a batch fetched across an assignment change, and read it again.

        getmany() already moved the consumer past these records. When they were fetched
        after the new assignment's seek to committed (the fetch was in flight while the
        assignment ran), nothing would read them again: the worker would wait forever, or
        a later batch would commit past them. So every partition still ours, whose task has
        nothing queued or running yet, is sought back to the earlier of the first discarded
        record and the task's committed position: nothing is skipped, and records below the
        committed position are filtered out when processed (a re-read at most).
        """
        consumer = self.consumer
        assert consumer is not None
        for tp, records in batch.items():
            task = self.tasks.get(tp.partition)
            if not records or task is None or task.closing or tp not in task.next_offsets:
                continue  # not ours (the owner reads them) or not positioned yet
            if task.queued() or (task.runner is not None and not task.runner.done()):
                continue  # already reading this generation's records
            start = min(records[0].offset, task.next_offsets[tp])
            log.info("%s[%s]: fetched across a reassignment; reading again from %s",
                     tp.topic, tp.partition, start)  # fmt: skip
            consumer.seek(tp, start)
            self.stats["refetches"] += 1

    def _refetch_installed(
        self, batch: dict[TopicPartition, list[ConsumerRecord]], installs: int
    ) -> dict[TopicPartition, list[ConsumerRecord]]:
        """Split off the records of tasks rebuilt while `batch` was fetched: those are read
        again (`_refetch`); the rest of the batch is good and is returned."""
        stale = {tp: records for tp, records in batch.items()
                 if self._installed_at.get(tp.partition, -1) > installs}  # fmt: skip
        self._refetch(stale)
        return {tp: records for tp, records in batch.items() if tp not in stale}

    def _schedule_ticks(self) -> None:
        """Mark punctuation due on every idle or busy task whose interval has passed."""
        if not self.punctuators:
            return
        now = time.monotonic()
        interval = self.config.punctuate_ms / 1000
        for task in self.tasks.values():
            if task.closing or now - task.last_tick < interval:
                continue
            task.tick, task.last_tick = True, now
            if task.runner is None or task.runner.done():
                task.runner = asyncio.ensure_future(self._drain(task))

    async def _drain(self, task: Task) -> None:
        """Process a task's queued records (then a due punctuation) until none are left."""
        try:
            while not task.closing and self.tasks.get(task.partition) is task:
                if task.inbox:
                    lists = [records for records in task.inbox.values() if records]
                    task.inbox = {}
                    await self._process_task(task, lists)
                    if task.paused and task.queued() <= self.config.max_batch:
                        task.paused = False
                        self._resume(task)
                elif task.tick:
                    task.tick = False
                    await self._process_batch(task, [], tick=True)
                else:
                    break
        except Exception as exc:
            # Not a Kafka error the batch loop retries: a failed abort, an aiokafka state
            # assertion, a RocksDB write that failed after the commit, a bug. The task's
            # producer and stores can no longer be trusted: rebuild it from committed state.
            if task.closing or self.tasks.get(task.partition) is not task:
                # Being released (or already replaced): the next owner starts from
                # committed state anyway; nothing to rebuild here.
                log.warning("task %s failed while closing: %r", task.partition, exc)
                return
            log.exception("task %s failed; rebuilding it", task.partition)
            task.closing = True
            self._mark_broken(task.partition, exc)

    async def _process_task(self, task: Task, lists: list[list[ConsumerRecord]]) -> None:
        fresh = []
        for records in lists:
            tp = TopicPartition(records[0].topic, records[0].partition)
            expected = task.next_offsets[tp]
            kept = (
                [r for r in records if r.offset >= expected]
                if records[0].offset < expected
                else (records)
            )
            if kept:
                fresh.append(kept)
        if not fresh:
            return
        lists = fresh
        # Merge the partitions of the task by timestamp, keeping each partition's order.
        if len(lists) == 1:
            records = lists[0]
        else:
            records = list(heapq.merge(*lists, key=lambda r: r.timestamp))
        if not await self._process_batch(task, records):
            # The broker refused an output and several inputs could have caused it: commit
            # one record per transaction, so the culprit is known and only it is poison.
            for record in records:
                if task.closing or self.tasks.get(task.partition) is not task:
                    return
                await self._process_batch(task, [record])

    async def _process_batch(
        self, task: Task, records: list[ConsumerRecord], tick: bool = False
    ) -> bool:
        """Process and commit `records` as one transaction, retrying from committed state.

        With `tick`, the batch is a punctuation (no records): the punctuators run instead.
        Returns False when a broker-refused output cannot be tied to one input record.
        """
        p = task.partition
        delay = 0.1
        attempt = 0
        now_ms = int(time.time() * 1000)
        while True:
            attempt += 1
            txn = TaskTransaction(task.stores)
            outputs: list = []
            if tick:
                if not self._run_punctuators(task, txn, outputs, now_ms):
                    return True  # a punctuator bug: logged; the next tick tries again
                if not outputs and not any(True for _ in txn.changed()):
                    task.failure = None  # the timers ran cleanly (and nothing was due)
                    return True
            elif not self._run_agents(task, txn, outputs, records):
                continue  # an agent raised: that record is now poison; process again
            try:
                await self._commit(task, txn, outputs, records)
                task.failure = None
                return True
            except FENCED_ERRORS:
                await self._fenced(task)
                return True
            except KafkaError as exc:
                self.stats["aborts"] += 1
                if not await self._abort(task):
                    return True  # fenced: the group decides who processes it again
                culprits = getattr(exc, "paysaga_records", None)
                if culprits and tick:
                    # A timer's output the broker refuses: no input to make poison. Say so
                    # (not ready) and let the next tick try again.
                    log.error("task %s punctuation output refused: %r", p, exc)
                    self.stats["punctuate_errors"] += 1
                    task.failure = f"punctuation: {type(exc).__name__}"
                    return True
                if culprits:
                    if len(culprits) > 1:
                        return False
                    r = records[next(iter(culprits))]
                    reason = f"output refused by the broker: {type(exc).__name__}"
                    task.poison[(r.topic, r.partition, r.offset)] = ("poison", reason)
                    continue
                # Kafka is failing us: accept no further work for this task (readiness goes
                # false), back off and process the same batch again from committed state.
                log.warning("task %s batch attempt %s failed: %r; retrying", p, attempt, exc)
                task.failure = f"{type(exc).__name__} (attempt {attempt})"
                if attempt >= self.config.max_attempts:
                    raise TaskBroken(f"{attempt} attempts failed, last: {exc!r}") from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                if task.closing or self.tasks.get(p) is not task:
                    return True  # given up: uncommitted, so the next owner reads it again

    def _run_punctuators(
        self, task: Task, txn: TaskTransaction, outputs: list, now_ms: int
    ) -> bool:
        ctx = Context(txn, outputs, task.partition, self.config.redact)
        try:
            for punctuate in self.punctuators:
                punctuate(ctx, now_ms)
        except StoreError:
            raise  # the database, not the timer: the task is rebuilt
        except Exception as exc:
            log.exception("punctuator failed on task %s", task.partition)
            self.stats["punctuate_errors"] += 1
            task.failure = f"punctuation: {type(exc).__name__}"
            return False
        self.stats["punctuations"] += 1
        return True

    def _run_agents(
        self, task: Task, txn: TaskTransaction, outputs: list, records: list[ConsumerRecord]
    ) -> bool:
        """Run the agents over the batch; False if one raised (its record is marked poison)."""
        ctx = Context(txn, outputs, task.partition, self.config.redact)
        dlq = self.config.dlq_topic
        poison = task.poison
        for i, record in enumerate(records):
            ctx.record = record
            ctx.index = i
            mark = poison.get((record.topic, record.partition, record.offset))
            if mark is not None:
                ctx.dead_letter(mark[0], mark[1], dlq, attempts=2)
                self.stats["dead_letters"] += 1
                continue
            try:
                self.agents[record.topic].process(ctx, record)
            except StoreError:
                raise  # the local database failed, not the record: the task is rebuilt
            except Exception as exc:
                reason = self.config.redact(f"agent {self.agents[record.topic].name} raised "
                                f"{type(exc).__name__}: {exc}")[:500]  # fmt: skip
                log.error("poison record %s[%s]@%s: %s", record.topic, record.partition,
                          record.offset, reason)  # fmt: skip
                poison[(record.topic, record.partition, record.offset)] = ("poison", reason)
                self.stats["aborts"] += 1
                return False
        return True

    async def _partitions(self, producer: AIOKafkaProducer, topic: str) -> int:
        count = self._partition_counts.get(topic)
        if count is None:
            count = len(await producer.partitions_for(topic))
            self._partition_counts[topic] = count
        return count

    async def _commit(
        self, task: Task, txn: TaskTransaction, outputs: list, records: list[ConsumerRecord]
    ) -> None:
        producer = task.producer
        t0 = time.monotonic()
        await producer.begin_transaction()
        last: dict[tuple[str, int], int] = {}
        for r in records:  # each partition's records are in offset order: the last wins
            last[(r.topic, r.partition)] = r.offset
        offsets = {TopicPartition(t, p): OffsetAndMetadata(o + 1, "") for (t, p), o in last.items()}
        # The input offsets go first, and on their own. A transaction's first request to the
        # coordinator often arrives while the previous transaction's markers are still being
        # written and gets CONCURRENT_TRANSACTIONS (11-13 % of transactions at 1,000
        # events/s here). aiokafka retries a first AddPartitionsToTxn after a fixed 20 ms,
        # but AddOffsetsToTxn after `retry_backoff_ms`: offsets first halves that wait. On
        # their own: with AddOffsetsToTxn in flight alongside produce requests, the broker's
        # per-partition transaction verification (KIP-890) answers CONCURRENT_TRANSACTIONS,
        # which reaches aiokafka as a retried NotEnoughReplicasError. The order inside a
        # transaction changes nothing else: the offsets and the outputs become visible
        # together at the commit, or never.
        if offsets:  # a punctuation has no input offsets
            await producer.send_offsets_to_transaction(offsets, self.config.app_id)
        t1 = time.monotonic()
        futures = []
        owners = []
        for topic, key, value, headers, index in outputs:
            n = await self._partitions(producer, topic)
            part = partition_for(key, n) if key is not None else index % n
            try:
                fut = await producer.send(topic, value, key=key, partition=part, headers=headers)
            except RECORD_ERRORS as exc:  # refused before sending (e.g. over max_request_size)
                exc.paysaga_records = {index}  # type: ignore[attr-defined]
                raise
            futures.append(fut)
            owners.append(index)
        changelog: list[tuple[str, TableTransaction, int]] = []
        for name, table_txn in txn.changed():
            topic = self.config.changelog(name)
            first = len(futures)
            for key, value in table_txn.changes.items():
                futures.append(await producer.send(topic, value, key=key, partition=task.partition))
            changelog.append((name, table_txn, first))
        results = await asyncio.gather(*futures, return_exceptions=True)
        errors = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
        if errors:
            first = errors[0][1]
            if all(isinstance(e, RECORD_ERRORS) and i < len(owners) for i, e in errors):
                # All inputs whose outputs shared a refused producer batch are suspects.
                first.paysaga_records = {owners[i] for i, _ in errors}  # type: ignore[attr-defined]
            raise first
        t2 = time.monotonic()
        await producer.commit_transaction()
        t3 = time.monotonic()
        st = self.stats
        st["offsets_seconds"] += t1 - t0
        st["send_seconds"] += t2 - t1
        st["commit_seconds"] += t3 - t2
        for tp, position in offsets.items():
            task.next_offsets[tp] = position.offset
        # Committed: now (and only now) the local state may reflect the batch.
        for name, table_txn, first in changelog:
            last = results[first + len(table_txn.changes) - 1]
            task.stores[name].apply(table_txn.changes, last.offset)
        if task.poison:
            for r in records:
                task.poison.pop((r.topic, r.partition, r.offset), None)
        task.committed_batches += 1
        self.stats["records"] += len(records)
        self.stats["batches"] += 1

    async def _abort(self, task: Task) -> bool:
        """Abort the open transaction (False: fenced). A producer that cannot abort gets the
        task rebuilt."""
        try:
            await task.producer.abort_transaction()
        except FENCED_ERRORS:
            await self._fenced(task)
            return False
        except Exception as exc:
            raise TaskBroken(f"abort failed: {exc!r}") from exc
        return True

    async def _fenced(self, task: Task) -> None:
        """Another producer instance took this task's transactional id: stop, and rejoin.

        Nothing of ours can commit any more. The group, not this worker, decides whether the
        partition is still ours: the task is dropped (its partitions paused, its producer and
        stores closed) and the fetch loop rejoins. Reopening at once could fence the new
        owner in turn.
        """
        p = task.partition
        log.warning("task %s fenced: its producer was replaced; rejoining the group", p)
        self.stats["fenced"] += 1
        task.closing = True
        self._rejoin = f"task {p} fenced; rejoining the group"
        if self.tasks.get(p) is task:
            self._pause(p)
            await self._close_task(p)  # never awaits the runner: this may be the runner
