"""A reset's rebuild (`ReplaySource(rebuild=True)`, docs/replay.md#reset), with the test
driver (real RocksDB, no broker): what it cannot re-execute as the live run did stops it
with the reason, instead of becoming poison or a skipped punctuation."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiokafka.structs import ConsumerRecord

from paysaga.streams.engine import ProcessorContext, PunctuationType, Topology
from paysaga.streams.engine.config import ReplaySource
from paysaga.streams.engine.driver import TopologyTestDriver
from paysaga.streams.engine.journal import Entry
from paysaga.streams.engine.processor import BadRecord
from paysaga.streams.engine.task import RebuildRefused
from paysaga.tables.transaction import TaskTransaction

T = "t"


def _topology() -> Topology:
    topology = Topology()

    @topology.agent("a", sources=["in"], tables=[T], decode=lambda r: json.loads(r.value))
    def agent(ctx: ProcessorContext, event: dict[str, Any]) -> None:
        if event.get("refuse"):
            raise ValueError("this code refuses it")
        ctx.table(T).set(event["k"].encode(), b"seen")
        ctx.timers("deadline").set(event["k"].encode(), 5_000)

    @agent.timer("deadline", T, PunctuationType.WALL_CLOCK)
    def deadline(ctx: ProcessorContext, key: bytes, due: int) -> None:
        raise RuntimeError("this code refuses the timeout")

    return topology


def _rebuilding(driver: TopologyTestDriver) -> None:
    driver.state.config.replay = ReplaySource("app.paysaga.journal", {}, rebuild=True)


def test_an_agent_raising_on_a_record_stops_the_rebuild_and_names_it(tmp_path: Path) -> None:
    driver = TopologyTestDriver(_topology(), tmp_path, wall_ms=0)
    try:
        _rebuilding(driver)
        task = driver._task(0)
        record = driver._record("in", 0, b"p1", b'{"k": "p1", "refuse": true}', 1, [])
        with pytest.raises(RebuildRefused) as refused:
            driver.runner.run_records(task, TaskTransaction(task.stores), [], [record])
        assert "in[0]@0, which the live run processed" in str(refused.value)
        assert "agent a raised ValueError: this code refuses it" in str(refused.value)
        assert not task.poison, "a rebuild makes nothing poison: its letter would be lost"
    finally:
        driver.close()


def test_a_recorded_punctuation_that_raises_stops_the_rebuild(tmp_path: Path) -> None:
    driver = TopologyTestDriver(_topology(), tmp_path, wall_ms=0)
    try:
        driver.pipe("in", b'{"k": "p1"}', key=b"p1")  # live: arms p1's deadline at 5000
        _rebuilding(driver)
        task = driver._task(0)
        entry = Entry(now=10_000, stream_time=0, ticked=())  # the live run's timer tick
        journal = ConsumerRecord("app.paysaga.journal", 0, 7, 0, 0, None, b"{}", None, 0, 2, ())
        with pytest.raises(RebuildRefused) as refused:
            asyncio.run(driver.runner.process_batch(task, [], tick=True, replay=(entry, journal)))
        assert "a punctuation the live run ran (its timers)" in str(refused.value)
        assert driver.table(T)[b"p1"] == b"seen"
    finally:
        driver.close()


def test_outside_a_rebuild_the_same_raise_is_poison(tmp_path: Path) -> None:
    """The contrast: live, the record goes to the DLQ and the worker goes on."""
    driver = TopologyTestDriver(_topology(), tmp_path, wall_ms=0)
    try:
        driver.pipe("in", b'{"k": "p2", "refuse": true}', key=b"p2")
        [letter] = driver.outputs("dlq")
        assert letter.key == b"p2" and not driver.table(T)
    finally:
        driver.close()


def _decoding_topology() -> Topology:
    topology = Topology()

    def decode(r: ConsumerRecord) -> dict[str, Any]:
        if r.value == b"BAD":
            raise BadRecord("decode", "this code cannot read it")
        return dict(json.loads(r.value))

    @topology.agent("a", sources=["in"], tables=[T], decode=decode)
    def agent(ctx: ProcessorContext, event: dict[str, Any]) -> None:
        ctx.table(T).set(event["k"].encode(), b"seen")

    return topology


@pytest.mark.parametrize("live_refused", [True, False])
def test_a_decode_failure_stops_a_rebuild_unless_the_live_run_had_it(
    tmp_path: Path, live_refused: bool
) -> None:
    """The journal keeps the inputs a decoder refused (`Entry.decoded`): the same refusal
    again is the live run's dead letter (in the DLQ already); a new one would drop a
    record from the rebuilt state without a word, so it stops the rebuild."""
    driver = TopologyTestDriver(_decoding_topology(), tmp_path, wall_ms=0)
    try:
        _rebuilding(driver)
        task = driver._task(0)
        record = driver._record("in", 0, b"p1", b"BAD", 1, [])
        decoded = (("in", 0, 0),) if live_refused else ()
        task.attempt_entry = Entry(now=0, stream_time=0, decoded=decoded)
        outputs: list[Any] = []
        run = lambda: driver.runner.run_records(  # noqa: E731
            task, TaskTransaction(task.stores), outputs, [record]
        )
        if live_refused:
            assert run() is not None and [o[0] for o in outputs] == ["dlq"]
            assert task.attempt_decoded == [("in", 0, 0)]
        else:
            with pytest.raises(RebuildRefused, match="which the live run decoded"):
                run()
    finally:
        driver.close()
