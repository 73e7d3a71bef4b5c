"""Opening a task: its producer (which fences any previous owner) and its stores, restored
from their changelogs; and closing one without letting a hung producer hold the engine up
(docs/exactly-once.md#state-never-ahead-of-kafka).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from paysaga.streams.engine.commit import MAX_REQUEST_BYTES
from paysaga.streams.engine.processor import TimerClock
from paysaga.streams.engine.state import EngineState
from paysaga.streams.engine.task import Task
from paysaga.tables.store import PartitionStore

log = logging.getLogger(__name__)

#: Producer stops that outlived their deadline (see `stop_producer`). asyncio holds only
#: weak references to tasks: without this one could be collected half-way.
_STOPPING: set[asyncio.Future[None]] = set()


def _stopped(p: int, stopping: asyncio.Future[None]) -> None:
    _STOPPING.discard(stopping)
    if not stopping.cancelled() and stopping.exception() is not None:
        log.warning("task %s producer stop: %r", p, stopping.exception())


class RestoreClock:
    """Counts wall-clock time while any restore runs (`restore_seconds`): restores of an
    assignment overlap, and summing each one's time would understate the rate."""

    def __init__(self, stats: dict[str, float]) -> None:
        self.stats = stats
        self.running = 0
        self.since = 0.0

    def begins(self) -> None:
        if self.running == 0:
            self.since = time.monotonic()
        self.running += 1

    def ends(self) -> None:
        self.running -= 1
        if self.running == 0:
            self.stats["restore_seconds"] += time.monotonic() - self.since


class Recovery:
    """Opens and closes tasks for the task manager."""

    def __init__(self, state: EngineState) -> None:
        self.state = state
        self.clock = RestoreClock(state.stats)

    async def open_task(self, p: int) -> Task:
        config = self.state.config
        producer = AIOKafkaProducer(
            bootstrap_servers=config.bootstrap,
            transactional_id=f"{config.app_id}-task-{p}",
            enable_idempotence=True,
            acks="all",
            linger_ms=config.linger_ms,
            max_batch_size=256 * 1024,
            max_request_size=MAX_REQUEST_BYTES,
            # A transaction's first request often meets CONCURRENT_TRANSACTIONS while the
            # last one's markers are written (see `commit`); aiokafka's default 100 ms
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
            for table in self.state.tables:
                stores[table] = await self.restore(table, p)
        except BaseException:
            for store in stores.values():
                store.close()
            await stop_producer(p, producer)
            raise
        clocks = {name: TimerClock() for name in self.state.runtime.clock_names}
        return Task(p, producer, stores, clocks=clocks)

    async def restore(self, table: str, p: int) -> PartitionStore:
        """Open the store and replay its changelog from the offset it reflects to the end."""
        manager = self.state.stores
        store = manager.open(table, p)
        tp = TopicPartition(self.state.config.changelog(table), p)
        reader = AIOKafkaConsumer(
            bootstrap_servers=self.state.config.bootstrap,
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
                manager.wipe(table, p)
                store = manager.open(table, p)
                applied = None
            # Explicit offsets: aiokafka's seek_to_beginning right after assign() can lose
            # to the initial reset and land at the end (seen with auto_offset_reset=latest).
            if applied is None:
                reader.seek(tp, (await reader.beginning_offsets([tp]))[tp])
            else:
                reader.seek(tp, applied + 1)
            start = await reader.position(tp)
            restored = 0
            self.clock.begins()
            try:
                while await reader.position(tp) < end:
                    batch = await reader.getmany(tp, timeout_ms=50, max_records=20_000)
                    records = batch.get(tp, [])
                    if records:
                        store.apply({r.key: r.value for r in records}, records[-1].offset)
                        self.state.stats["restored"] += len(records)
                        restored += len(records)
            finally:
                self.clock.ends()
            log.info("%s[%s]: restored %d changelog records (%d..%d)", table, p, restored,
                     start, end)  # fmt: skip
            return store
        except BaseException:
            store.close()  # release the RocksDB lock now: a repair reopens it
            raise
        finally:
            await reader.stop()


async def shut(task: Task) -> None:
    """Close a task that is not (or no longer) installed: its stores, then its producer."""
    for store in task.stores.values():
        store.close()
    if task.producer is not None:
        await stop_producer(task.partition, task.producer)


async def stop_producer(p: int, producer: AIOKafkaProducer, timeout: float = 10.0) -> None:
    """Stop a task's producer without letting a hung one hold up the engine.

    A fenced or broken producer may fail to stop, and one whose broker stopped answering
    waits to flush its unsent records, retrying for as long as the outage lasts. Those
    records belong to a transaction that is never committed (and the task's next producer
    fences this one), so nothing waits for them: after `timeout` the stop goes on in the
    background and ends once the broker answers again. Cancelling it instead would leave
    the producer's sender task and connections behind for good.
    """
    stopping: asyncio.Future[None] = asyncio.ensure_future(producer.stop())
    _STOPPING.add(stopping)
    stopping.add_done_callback(functools.partial(_stopped, p))
    done, _ = await asyncio.wait([stopping], timeout=timeout)
    if not done:
        log.warning("task %s producer did not stop in %s s; it goes on stopping in the "
                    "background", p, timeout)  # fmt: skip
