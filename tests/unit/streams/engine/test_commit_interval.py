"""The commit interval (docs/architecture.md#the-commit-interval): a task starts a batch at
most every `commit_interval_ms`; records that arrive sooner wait for the next one. It never
holds back a full batch, a task being closed, or a replay.

The runner is the test driver's (real RocksDB, no broker), whose clock moves only when the
test says; the wait itself is the runner's `_interval`, as the drain loop calls it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.structs import TopicPartition

from paysaga.streams.engine import ProcessorContext, Topology
from paysaga.streams.engine.config import EngineConfig, ReplaySource
from paysaga.streams.engine.driver import TopologyTestDriver
from paysaga.streams.engine.fetch import MIN_HOLD_MS, fetch_wait
from paysaga.streams.engine.manager import TaskManager
from paysaga.streams.engine.recovery import Recovery
from paysaga.streams.engine.task import Task

INTERVAL_MS = 60_000  # far longer than any test here: a wait is never cut by the clock


def _topology() -> Topology:
    topology = Topology(serializer=lambda schema, fields: repr(sorted(fields.items())).encode())

    @topology.agent("count", sources=["in"])
    def count(ctx: ProcessorContext, record: Any) -> None:
        ctx.emit("out", "Seen", {"key": record.key.decode()}, key=record.key)

    return topology


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[TopologyTestDriver]:
    driver = TopologyTestDriver(_topology(), tmp_path, wall_ms=10_000)
    driver.state.config.commit_interval_ms = INTERVAL_MS
    driver.state.config.max_batch = 10
    yield driver
    driver.close()


def _queue(driver: TopologyTestDriver, task: Task, n: int) -> None:
    """`n` fetched records waiting in the task's queue."""
    records = [driver._record("in", 0, f"k{i}".encode(), b"v", i, []) for i in range(n)]
    task.inbox = {TopicPartition("in", 0): records}


async def _waits(driver: TopologyTestDriver, task: Task, turns: int = 20) -> asyncio.Task[None]:
    """Start the interval's wait; the task is returned still waiting after `turns` turns of
    the loop (asserted), for the caller to end."""
    waiting = asyncio.ensure_future(driver.runner._interval(task))
    for _ in range(turns):
        await asyncio.sleep(0)
    assert not waiting.done(), "the batch started before its interval was out"
    return waiting


def _started_now(driver: TopologyTestDriver, n: int, p: int = 0) -> Task:
    """Task `p`, whose last batch started just now, with `n` records queued."""
    task = driver._task(p)
    task.batch_started = driver.clock.monotonic()
    _queue(driver, task, n)
    return task


def test_records_arriving_within_the_interval_wait_until_a_full_batch_is_queued(
    driver: TopologyTestDriver,
) -> None:
    async def go() -> None:
        task = _started_now(driver, 3)
        waiting = await _waits(driver, task)
        task.wake.set()  # what the fetch loop does once max_batch records are queued
        await asyncio.wait_for(waiting, 5)

    asyncio.run(go())


def test_a_full_batch_closing_task_or_passed_interval_does_not_wait(
    driver: TopologyTestDriver,
) -> None:
    async def go() -> None:
        full = _started_now(driver, driver.state.config.max_batch)
        await asyncio.wait_for(driver.runner._interval(full), 5)

        closing = _started_now(driver, 1, p=1)
        closing.closing = True
        await asyncio.wait_for(driver.runner._interval(closing), 5)

        late = _started_now(driver, 1, p=2)
        await _waits(driver, late)  # not over yet ...
        driver.clock.now_ms += INTERVAL_MS  # ... and now it is
        await asyncio.wait_for(driver.runner._interval(late), 5)

    asyncio.run(go())


def test_queueing_a_full_batch_wakes_the_waiting_runner(driver: TopologyTestDriver) -> None:
    async def go() -> None:
        task = _started_now(driver, 0)
        task.inbox = {}
        waiting = await _waits(driver, task)
        records = [driver._record("in", 0, b"k", b"v", i, []) for i in range(10)]
        # What the fetch loop does with each fetch (streams/engine/fetch.py).
        assert task.enqueue(TopicPartition("in", 0), records[:9], full=10) == 9
        for _ in range(20):
            await asyncio.sleep(0)
        assert not waiting.done(), "nine records of a batch of ten started it"
        assert task.enqueue(TopicPartition("in", 0), records[9:], full=10) == 10
        await asyncio.wait_for(waiting, 5)

    asyncio.run(go())


def test_closing_a_task_ends_its_runner_s_wait(driver: TopologyTestDriver) -> None:
    """A revocation (`TaskManager.detach`) waits for the task's runner: a runner waiting out
    a minute-long interval must stop at once, not hold the rebalance up."""

    async def go() -> None:
        task = _started_now(driver, 2)
        task.runner = await _waits(driver, task)
        manager = TaskManager(driver.state, Recovery(driver.state))
        detached = await asyncio.wait_for(manager.detach(0), 5)
        assert detached is task and task.closing and 0 not in driver.state.tasks

    asyncio.run(go())


def test_no_interval_in_a_replay_or_when_it_is_off(driver: TopologyTestDriver) -> None:
    async def go() -> None:
        config = driver.state.config
        config.replay = ReplaySource(journal_topic="live.journal")
        await asyncio.wait_for(driver.runner._interval(_started_now(driver, 1)), 5)
        config.replay = None
        config.commit_interval_ms = 0
        await asyncio.wait_for(driver.runner._interval(_started_now(driver, 1)), 5)

    asyncio.run(go())


def test_fetches_wait_for_a_batch_of_data_only_with_an_interval() -> None:
    base = EngineConfig(bootstrap="b", app_id="a", dlq_topic="d", changelog=str)
    assert fetch_wait(base) == {"fetch_max_wait_ms": base.fetch_max_wait_ms, "fetch_min_bytes": 1}
    timed = dataclasses.replace(base, commit_interval_ms=100)
    assert fetch_wait(timed) == {"fetch_max_wait_ms": 100,
                                 "fetch_min_bytes": base.interval_fetch_min_bytes}  # fmt: skip
    replay = dataclasses.replace(timed, replay=ReplaySource(journal_topic="j"))
    assert fetch_wait(replay)["fetch_min_bytes"] == 1  # a replay's batches never wait
    short = dataclasses.replace(base, commit_interval_ms=MIN_HOLD_MS - 1)
    assert fetch_wait(short) == fetch_wait(base)  # no hold shorter than an idle fetch's wait
