"""The engine as a service of the worker: one consumer, the fetch loop, and its tasks.

Kafka Streams' StreamThread (docs/exactly-once.md#tasks): it owns the group membership and
the consumer, hands fetched records to each task's runner (each task commits on its own
schedule, so one slow commit does not hold back the other partitions), pauses a task that
falls behind, reads a batch again when it was fetched across an assignment change, makes
wall-clock punctuation due, and rejoins the group after a task was fenced.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

import mode
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.structs import ConsumerRecord, TopicPartition

from paysaga.streams.engine.assignor import HostAwareAssignor
from paysaga.streams.engine.config import EngineConfig
from paysaga.streams.engine.manager import TaskManager
from paysaga.streams.engine.metrics import MetricSink
from paysaga.streams.engine.recovery import Recovery
from paysaga.streams.engine.runner import TaskRunner
from paysaga.streams.engine.state import EngineState
from paysaga.streams.engine.topology import Topology
from paysaga.tables.store import PartitionStore, StoreManager

log = logging.getLogger(__name__)


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, engine: ExactlyOnceEngine) -> None:
        self.engine = engine

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        self.engine.forget_owners()  # a rebalance: the old map may be wrong from now on
        await self.engine.release({tp.partition for tp in revoked})

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self.engine.acquire({tp.partition for tp in assigned})


#: The shortest commit interval fetches are held for: a shorter hold would ask an idle
#: broker more often than `fetch_max_wait_ms` does.
MIN_HOLD_MS = 50


def fetch_wait(config: EngineConfig) -> dict[str, int]:
    """How the consumer's fetches wait: with a commit interval (of `MIN_HOLD_MS` or more),
    for a batch's worth of data up to the interval (the batch would wait as long);
    otherwise for the first record, up to `fetch_max_wait_ms` when there is none
    (docs/operations.md#fetching)."""
    interval = int(config.commit_interval_ms)
    if interval >= MIN_HOLD_MS and config.replay is None:
        return {"fetch_max_wait_ms": interval, "fetch_min_bytes": config.interval_fetch_min_bytes}
    return {"fetch_max_wait_ms": config.fetch_max_wait_ms, "fetch_min_bytes": 1}


class ExactlyOnceEngine(mode.Service):
    """Consume, process and produce with exactly-once semantics (docs/exactly-once.md)."""

    def __init__(
        self, config: EngineConfig, topology: Topology, stores: StoreManager,
        metrics: MetricSink | None = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        sources = topology.sources
        if config.tick_topic is not None:
            sources = sorted({*sources, config.tick_topic})
        if config.replay is not None:  # a replay's one input is the live journal
            sources = [config.replay.journal_topic]
        self.sources = sources
        self.shared = EngineState(
            config=config, topology=topology, stores=stores, routes=topology.by_source(),
            runtime=topology.runtime(config.dlq_topic, config.redact), tables=topology.tables,
        )  # fmt: skip
        if metrics is not None:
            self.shared.metrics = metrics
        #: Learns which endpoint owns each task from the group (None: no endpoint given).
        self.assignor = None if config.endpoint is None else HostAwareAssignor(config.endpoint)
        self.recovery = Recovery(self.shared)
        self.manager = TaskManager(self.shared, self.recovery)
        self.runner = TaskRunner(self.shared, self.manager)
        super().__init__(**kwargs)

    # ---- what views and tests read ------------------------------------------------------
    @property
    def config(self) -> EngineConfig:
        return self.shared.config

    @property
    def consumer(self) -> AIOKafkaConsumer | None:
        return self.shared.consumer

    @property
    def tasks(self) -> dict[int, Any]:
        return self.shared.tasks

    @property
    def stats(self) -> dict[str, float]:
        return self.shared.stats

    def owner(self, partition: int) -> str | None:
        """The endpoint that owns task `partition` in the group's current generation, from
        the group's own assignment (streams/engine/assignor.py). None while a rebalance is
        on (the map is forgotten at revocation), when the group agreed on the plain range
        protocol, or without an endpoint."""
        if self.assignor is None or not self.shared.assigned or self.shared.rejoin:
            return None
        return self.assignor.owners.get(partition)

    def forget_owners(self) -> None:
        if self.assignor is not None:
            self.assignor.owners = {}

    @property
    def metrics(self) -> MetricSink:
        """Where committed figures go (streams/engine/metrics.py)."""
        return self.shared.metrics

    @property
    def assigned(self) -> bool:
        return self.shared.assigned

    @property
    def broken(self) -> dict[int, str]:
        return self.shared.broken

    @property
    def failed(self) -> str | None:
        """Why the worker is not healthy right now (None when every task is fine)."""
        s = self.shared
        if s.fatal is not None:
            return s.fatal
        if s.rejoin is not None:
            return s.rejoin
        if s.broken:
            p = min(s.broken)
            return f"task {p}: {s.broken[p]}"
        failing = sorted(p for p, task in s.tasks.items() if task.failure is not None)
        return f"task {failing[0]}: {s.tasks[failing[0]].failure}" if failing else None

    @property
    def recovering(self) -> bool:
        """Tasks of the current assignment are still being opened and restored."""
        return bool(self.shared.opening)

    @property
    def ready(self) -> bool:
        return self.shared.assigned and not self.recovering and self.failed is None

    async def finished(self) -> bool:
        """A bounded run (stop offsets) has processed every owned input up to its stop.

        A partition is through when its next offset reached the stop, or when the consumer
        is past the stop with nothing of it left queued or running: what lies between the
        last record and the stop is then only transaction markers (a transactional input
        such as the tick topic ends with one)."""
        s = self.shared
        if not s.config.stop or not self.ready or not s.tasks or s.consumer is None:
            return False
        for task in s.tasks.values():
            idle = not task.queued() and (task.runner is None or task.runner.done())
            for tp, next_offset in task.next_offsets.items():
                stop = s.config.stop.get(tp)
                if stop is None or next_offset >= stop:
                    continue
                if not idle or await s.consumer.position(tp) < stop:
                    return False
        return True

    def stream_time(self, partition: int) -> int | None:
        task = self.shared.tasks.get(partition)
        return None if task is None else task.stream_time

    def store(self, table: str, partition: int) -> PartitionStore | None:
        task = self.shared.tasks.get(partition)
        return None if task is None else task.stores.get(table)

    def serving(self, table: str, partition: int) -> PartitionStore | None:
        """`store`, for answering queries: only of an open task in good order (not
        closing, not broken: its local state may lag what it committed)."""
        task = self.shared.tasks.get(partition)
        if task is None or task.closing or partition in self.shared.broken:
            return None
        return task.stores.get(table)

    # ---- lifecycle ----------------------------------------------------------------------
    async def on_start(self) -> None:
        config = self.shared.config
        consumer = AIOKafkaConsumer(
            bootstrap_servers=config.bootstrap,
            group_id=config.group,
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # With an endpoint, the host-aware protocol first; plain range too, so a group
            # with an older member still agrees on one (and then has no owner map).
            partition_assignment_strategy=(RangePartitionAssignor,)
            if self.assignor is None
            else (self.assignor, RangePartitionAssignor),
            **fetch_wait(config),
            max_poll_interval_ms=600_000,
            session_timeout_ms=config.session_timeout_ms,
            heartbeat_interval_ms=config.session_timeout_ms // 3,
            # How long the group waits for a member's revocation (in-flight batches commit
            # or abort, producers stop) before rebalancing without it. aiokafka defaults it
            # to the session timeout, which a release under load can outlast.
            rebalance_timeout_ms=max(60_000, config.session_timeout_ms),
        )
        self.shared.consumer = consumer
        await self.manager.start()
        consumer.subscribe(self.sources, listener=_Rebalance(self))
        await consumer.start()
        self.add_future(self._run())

    async def on_stop(self) -> None:
        # In-flight batches commit or abort first; opens and rebuilds under way are cancelled.
        await self.release(self.shared.owned | set(self.shared.tasks))
        if self.shared.consumer is not None:
            await self.shared.consumer.stop()
        await self.runner.close()
        await self.manager.stop()

    async def release(self, partitions: set[int]) -> None:
        await self.manager.release(partitions)

    async def acquire(self, partitions: set[int]) -> None:
        await self.manager.acquire(partitions)

    # ---- the fetch loop -----------------------------------------------------------------
    async def _run(self) -> None:
        try:
            await self._fetch_loop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never die silently: report not-ready and say why
            log.exception("fetch loop failed")
            self.shared.fatal = f"fetch loop: {type(exc).__name__}: {exc}"
            raise

    async def _fetch_loop(self) -> None:
        s = self.shared
        consumer = s.consumer
        assert consumer is not None
        limit = 2 * s.config.max_batch
        runner = self.runner
        while not self.should_stop:
            if s.rejoin is not None and s.assigned:
                self._force_rejoin()
            # Tasks to open, when due; never between a release and the next assignment.
            if self.manager.repair_due():
                self.manager.start_repair()
            generation = s.generation
            installs = s.installs
            batch = await consumer.getmany(
                timeout_ms=s.config.poll_timeout_ms, max_records=s.config.max_batch
            )
            if not batch:
                if runner.has_wall_work:
                    async with s.lock:
                        runner.schedule_ticks()
                continue
            async with s.lock:  # never interleave with an assignment change
                if generation != s.generation:
                    self._refetch(batch)
                    continue
                if installs != s.installs:  # a rebuilt task was sought meanwhile
                    batch = self._refetch_installed(batch, installs)
                for tp, records in batch.items():
                    task = s.tasks.get(tp.partition)
                    if task is None or task.closing or tp not in task.next_offsets:
                        continue  # not ours any more: the next owner reads them
                    queued = task.enqueue(tp, records, s.config.max_batch)
                    if not task.paused and queued > limit:
                        # Backpressure per task: a slow or retrying task stops fetching for
                        # itself only; the runner resumes it once it has caught up.
                        s.pause(task.partition)
                        task.paused = True
                    if task.runner is None or task.runner.done():
                        task.runner = asyncio.ensure_future(runner.drain(task))
                runner.schedule_ticks()

    def _force_rejoin(self) -> None:
        """Make the group assign partitions again (after a task's producer was fenced).

        Subscribing again is aiokafka's public way to rejoin: every task is released (its
        in-flight batch commits or aborts) and the assignment decides who owns what. A task
        fenced by a transaction timeout comes back here; one taken over by another worker
        does not.
        """
        s = self.shared
        assert s.consumer is not None
        log.warning("rejoining the group: %s", s.rejoin)
        s.stats["rejoins"] += 1
        s.assigned = False  # until the new assignment arrives
        s.consumer.subscribe(self.sources, listener=_Rebalance(self))

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
        s = self.shared
        assert s.consumer is not None
        for tp, records in batch.items():
            task = s.tasks.get(tp.partition)
            if not records or task is None or task.closing or tp not in task.next_offsets:
                continue  # not ours (the owner reads them) or not positioned yet
            if task.queued() or (task.runner is not None and not task.runner.done()):
                continue  # already reading this generation's records
            start = min(records[0].offset, task.next_offsets[tp])
            log.info("%s[%s]: fetched across a reassignment; reading again from %s",
                     tp.topic, tp.partition, start)  # fmt: skip
            s.consumer.seek(tp, start)
            s.stats["refetches"] += 1

    def _refetch_installed(
        self, batch: dict[TopicPartition, list[ConsumerRecord]], installs: int
    ) -> dict[TopicPartition, list[ConsumerRecord]]:
        """Split off the records of tasks rebuilt while `batch` was fetched: those are read
        again (`_refetch`); the rest of the batch is good and is returned."""
        installed_at = self.shared.installed_at
        stale = {tp: records for tp, records in batch.items()
                 if installed_at.get(tp.partition, -1) > installs}  # fmt: skip
        self._refetch(stale)
        return {tp: records for tp, records in batch.items() if tp not in stale}
