"""A batch's agents run in slices (docs/architecture.md#slices): the event loop gets turns
while a long batch runs, and the batch's outcome is the same as run at once.

The runner here is the test driver's (real RocksDB, no broker); the batch is run the way
the engine runs it (`TaskRunner._run_records`), beside a coroutine that counts its turns.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from paysaga.streams.engine import ProcessorContext, Topology
from paysaga.streams.engine.driver import TopologyTestDriver
from paysaga.streams.engine.processor import Output
from paysaga.tables.transaction import TaskTransaction

TABLE = "sums"


def _topology() -> Topology:
    topology = Topology(serializer=lambda schema, fields: repr(sorted(fields.items())).encode())

    @topology.agent("slow", sources=["in"], tables=[TABLE])
    def slow(ctx: ProcessorContext, record: Any) -> None:
        end = time.perf_counter() + 0.0005  # half a millisecond of work per record
        while time.perf_counter() < end:
            pass
        table = ctx.table(TABLE)
        key = record.key
        table.set(key, str(int(table.get(key) or b"0") + 1).encode())
        ctx.emit("out", "Count", {"key": key.decode(), "at": ctx.wall_clock_ms()}, key=key)

    return topology


def _run(tmp: Path, slice_ms: float) -> tuple[int, list[Output], dict[bytes, bytes | None]]:
    driver = TopologyTestDriver(_topology(), tmp, wall_ms=1_000)
    driver.state.config.slice_ms = slice_ms
    task = driver._task(0)
    records = [driver._record("in", 0, f"k{i % 5}".encode(), b"v", i, []) for i in range(200)]
    txn = TaskTransaction(task.stores)
    outputs: list[Output] = []

    async def go() -> tuple[int | None, int]:
        turns = 0

        async def other() -> None:
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        ticker = asyncio.ensure_future(other())
        await asyncio.sleep(0)
        before = turns
        try:
            ran = await driver.runner._run_records(task, txn, outputs, records, now=7_777)
            return ran, turns - before
        finally:
            ticker.cancel()

    stream_time, turns = asyncio.run(go())
    assert stream_time == 199
    changes = dict(txn.table(TABLE).changes)
    driver.close()
    return turns, outputs, changes


def test_a_long_batch_gives_the_loop_turns_and_ends_the_same(tmp_path: Path) -> None:
    turns, outputs, changes = _run(tmp_path / "sliced", slice_ms=2.0)
    at_once, outputs_at_once, changes_at_once = _run(tmp_path / "whole", slice_ms=0)
    # 200 records of 0.5 ms: about 100 ms, given a turn every 2 ms or so.
    assert turns >= 10, turns
    assert at_once <= 1, at_once
    assert outputs == outputs_at_once and changes == changes_at_once
    # Every agent call of the batch read the batch's one clock, slices or not.
    assert outputs and all(b"7777" in (value or b"") for _, _, value, *_ in outputs)
