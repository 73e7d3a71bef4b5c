"""The processor API on the test driver: real agents and real RocksDB, no broker.

Each test declares a small topology and asserts what the engine's runner does with it:
typed emits, declared tables, fan-out, stream time, both schedule types, durable timers,
windows (closing, late records) and the idle policy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest
from aiokafka.structs import ConsumerRecord

from paysaga.streams.engine import (
    BadRecord,
    ProcessorContext,
    PunctuationType,
    Topology,
    TopologyError,
)
from paysaga.streams.engine.deadletter import H_KIND, H_REASON, parse_headers
from paysaga.streams.engine.driver import TopologyTestDriver
from paysaga.tables.windows import Window, Windows

STATE = "state"


def _json_serializer(schema: str, fields: Any) -> bytes:
    return json.dumps({"schema": schema, **fields}, sort_keys=True).encode()


def _decode(record: ConsumerRecord) -> dict[str, Any]:
    try:
        return dict(json.loads(record.value))
    except (TypeError, ValueError) as exc:
        raise BadRecord("decode", f"not JSON: {exc}") from exc


def _event(key: str, ts: int, amount: int = 1) -> bytes:
    return json.dumps({"key": key, "ts": ts, "amount": amount}).encode()


@pytest.fixture
def driver_dir(tmp_path: Path) -> Path:
    return tmp_path / "driver"


def test_typed_emits_carry_the_inputs_event_time(driver_dir: Path) -> None:
    topology = Topology(serializer=_json_serializer)

    @topology.agent("echo", sources=["in"], decode=_decode, event_time=lambda e: e["ts"])
    def echo(ctx: ProcessorContext, event: dict[str, Any]) -> None:
        ctx.emit("out", "Echo", {"key": event["key"]}, key=event["key"].encode())
        ctx.emit("out", "Echo", {"key": "later"}, key=b"x", timestamp=event["ts"] + 5)

    driver = TopologyTestDriver(topology, driver_dir)
    try:
        # The record's Kafka timestamp (999) is not the event time: the extractor's is.
        out = driver.pipe("in", _event("a", 1_234), key=b"a", timestamp=999)
        assert [(o.topic, o.timestamp) for o in out] == [("out", 1_234), ("out", 1_239)]
        assert json.loads(out[0].value or b"") == {"schema": "Echo", "key": "a"}
        assert driver.stream_time() == 1_234
    finally:
        driver.close()


def test_without_an_extractor_event_time_is_the_records_timestamp(driver_dir: Path) -> None:
    topology = Topology()

    @topology.agent("raw", sources=["in"])
    def raw(ctx: ProcessorContext, record: ConsumerRecord) -> None:
        ctx.send("out", record.key, record.value)

    driver = TopologyTestDriver(topology, driver_dir)
    try:
        assert [o.timestamp for o in driver.pipe("in", b"v", key=b"k", timestamp=42)] == [42]
        driver.pipe("in", b"v", key=b"k", timestamp=10)  # out of order: stream time stays
        assert driver.stream_time() == 42
    finally:
        driver.close()


def test_an_undeclared_table_is_refused_and_the_input_dead_lettered(driver_dir: Path) -> None:
    topology = Topology()

    @topology.agent("mine", sources=["a"], tables=["mine"])
    def mine(ctx: ProcessorContext, record: ConsumerRecord) -> None:
        ctx.table("mine").set(b"k", b"v")

    @topology.agent("thief", sources=["b"], tables=[])
    def thief(ctx: ProcessorContext, record: ConsumerRecord) -> None:
        ctx.table("mine").set(b"stolen", b"v")

    driver = TopologyTestDriver(topology, driver_dir)
    try:
        driver.pipe("a", b"1", key=b"k")
        out = driver.pipe("b", b"2", key=b"k")
        assert [o.topic for o in out] == ["dlq"]
        headers = parse_headers(list(out[0].headers))
        assert headers[H_KIND] == "poison"
        assert "did not declare table 'mine'" in headers[H_REASON]
        assert b"stolen" not in driver.table("mine")
    finally:
        driver.close()


def test_topology_refuses_what_cannot_run() -> None:
    def build(**kinds: Any) -> Topology:
        topology = Topology()
        agent = topology.agent("a", sources=["in"], tables=kinds.get("tables", ()))(
            lambda ctx, r: None
        )
        if "timer_table" in kinds:
            agent.timer("t", kinds["timer_table"], PunctuationType.STREAM_TIME)(
                lambda ctx, k, d: None
            )
        if "interval" in kinds:
            agent.schedule(kinds["interval"], PunctuationType.WALL_CLOCK)(lambda ctx, t: None)
        if "twice" in kinds:
            topology.agent("a", sources=["other"])(lambda ctx, r: None)
        return topology

    with pytest.raises(TopologyError, match="does not declare"):
        _ = build(timer_table="undeclared").agents
    with pytest.raises(TopologyError, match="interval must be > 0"):
        _ = build(interval=0).agents
    with pytest.raises(TopologyError, match="two agents named a"):
        _ = build(twice=True).agents
    with pytest.raises(TopologyError, match="no serializer"):
        Topology().serializer("X", {})
    assert build(tables=["t"], timer_table="t").tables == ("t",)


def test_two_agents_on_one_source_both_run_in_the_batch(driver_dir: Path) -> None:
    topology = Topology()
    for name in ("first", "second"):

        @topology.agent(name, sources=["in"], tables=[name])
        def agent(ctx: ProcessorContext, record: ConsumerRecord, name: str = name) -> None:
            ctx.table(name).set(record.key or b"", record.value or b"")
            ctx.send(f"out.{name}", record.key, record.value)

    driver = TopologyTestDriver(topology, driver_dir)
    try:
        out = driver.pipe("in", b"v", key=b"k")
        assert [o.topic for o in out] == ["out.first", "out.second"]
        assert driver.table("first") == driver.table("second") == {b"k": b"v"}
    finally:
        driver.close()


def test_a_decoder_sends_bad_input_to_the_dlq_and_the_stream_goes_on(driver_dir: Path) -> None:
    topology = Topology()
    seen: list[str] = []

    @topology.agent("json", sources=["in"], decode=_decode, event_time=lambda e: e["ts"])
    def agent(ctx: ProcessorContext, event: dict[str, Any]) -> None:
        seen.append(event["key"])

    driver = TopologyTestDriver(topology, driver_dir)
    try:
        bad = driver.pipe("in", b"\xff not json", key=b"k")
        driver.pipe("in", _event("ok", 5), key=b"k")
        assert [o.topic for o in bad] == ["dlq"] and bad[0].value == b"\xff not json"
        assert parse_headers(list(bad[0].headers))[H_KIND] == "decode"
        assert seen == ["ok"]
    finally:
        driver.close()


def test_schedules_fire_on_stream_time_and_on_the_wall_clock(driver_dir: Path) -> None:
    topology = Topology()
    fired: list[tuple[str, int]] = []

    @topology.agent("a", sources=["in"], decode=_decode, event_time=lambda e: e["ts"])
    def agent(ctx: ProcessorContext, event: dict[str, Any]) -> None:
        pass

    @agent.schedule(1_000, PunctuationType.STREAM_TIME)
    def every_second_of_event_time(ctx: ProcessorContext, now: int) -> None:
        fired.append(("stream", now))

    @agent.schedule(60_000, PunctuationType.WALL_CLOCK)
    def every_minute_of_wall_clock(ctx: ProcessorContext, now: int) -> None:
        fired.append(("wall", now))

    driver = TopologyTestDriver(topology, driver_dir, wall_ms=1_000_000)
    try:
        for ts in (100, 900, 1_000, 1_500, 3_200, 3_100):
            driver.pipe("in", _event("k", ts), key=b"k")
        # The first input starts stream time; then each crossed 1 s boundary fires once.
        assert fired == [("stream", 100), ("stream", 1_000), ("stream", 3_200)]
        fired.clear()
        driver.advance_wall_clock(1)  # the first wall-clock punctuation runs every schedule
        driver.advance_wall_clock(30_000)  # not yet a minute since
        driver.advance_wall_clock(30_000)
        assert fired == [("wall", 1_000_001), ("wall", 1_060_001)]
    finally:
        driver.close()


def test_durable_timers_fire_once_at_their_due_time(driver_dir: Path) -> None:
    topology = Topology()

    @topology.agent("a", sources=["in"], tables=["t"], decode=_decode,
                    event_time=lambda e: e["ts"])  # fmt: skip
    def agent(ctx: ProcessorContext, event: dict[str, Any]) -> None:
        ctx.timers("expiry").set(event["key"].encode(), event["ts"] + 1_000)
        ctx.timers("nudge").set(event["key"].encode(), 5_000)

    @agent.timer("expiry", "t", PunctuationType.STREAM_TIME)
    def expired(ctx: ProcessorContext, key: bytes, due: int) -> None:
        ctx.send("expired", key, str(due).encode())

    @agent.timer("nudge", "t", PunctuationType.WALL_CLOCK)
    def nudge(ctx: ProcessorContext, key: bytes, due: int) -> None:
        ctx.send("nudged", key, str(due).encode())

    driver = TopologyTestDriver(topology, driver_dir, wall_ms=0)
    try:
        driver.pipe("in", _event("a", 100), key=b"a")
        driver.pipe("in", _event("a", 600), key=b"a")  # moves a's expiry to 1600
        driver.pipe("in", _event("b", 1_200), key=b"b")  # 1100 would have fired a's old one
        assert driver.outputs("expired") == []
        out = driver.pipe("in", _event("c", 1_600), key=b"c")
        assert [(o.key, o.value, o.timestamp) for o in out if o.topic == "expired"] == [
            (b"a", b"1600", 1_600)
        ]
        driver.pipe("in", _event("d", 9_000), key=b"d")
        assert [o.key for o in driver.outputs("expired")] == [b"a", b"b", b"c"]
        assert driver.advance_wall_clock(4_999) == []
        fired = driver.advance_wall_clock(1)
        assert sorted(cast(bytes, o.key) for o in fired) == [b"a", b"b", b"c", b"d"]
        assert driver.advance_wall_clock(10_000) == []  # fired timers are gone
    finally:
        driver.close()


def _window_topology(grace_ms: int = 0) -> Topology:
    topology = Topology()

    @topology.agent("sum", sources=["in"], tables=["sums"], decode=_decode,
                    event_time=lambda e: e["ts"])  # fmt: skip
    def add(ctx: ProcessorContext, event: dict[str, Any]) -> None:
        def fold(window: Window, current: bytes | None) -> bytes:
            return str(int(current or b"0") + event["amount"]).encode()

        for window in ctx.window("sums").update(event["key"].encode(), fold):
            ctx.send("late", window.key, json.dumps([window.start, event["amount"]]).encode())

    @add.window("sums", "sums", Windows.tumbling(1_000, grace_ms))
    def closed(ctx: ProcessorContext, window: Window, value: bytes) -> None:
        ctx.send("closed", window.key, json.dumps([window.start, int(value)]).encode())

    return topology


def _closed(driver: TopologyTestDriver) -> list[tuple[bytes | None, list[int], int | None]]:
    return [(o.key, json.loads(o.value or b""), o.timestamp) for o in driver.outputs("closed")]


def test_windows_close_by_stream_time_once_and_late_records_take_the_late_path(
    driver_dir: Path,
) -> None:
    driver = TopologyTestDriver(_window_topology(grace_ms=500), driver_dir, wall_ms=0)
    try:
        for key, ts, amount in (("a", 100, 1), ("a", 999, 2), ("b", 500, 10), ("a", 1_200, 4)):
            driver.pipe("in", _event(key, ts, amount), key=key.encode())
        assert _closed(driver) == []  # stream time 1200 < end 1000 + grace 500
        driver.pipe("in", _event("a", 1_300, 8), key=b"a")
        driver.pipe("in", _event("a", 400, 16), key=b"a")  # in grace: still counted
        driver.pipe("in", _event("c", 1_500, 1), key=b"c")  # stream time 1500: [0, 1000) closes
        assert _closed(driver) == [(b"a", [0, 19], 999), (b"b", [0, 10], 999)]
        late = driver.pipe("in", _event("a", 700, 32), key=b"a")  # its window closed
        assert [(o.topic, json.loads(o.value or b"")) for o in late] == [("late", [0, 32])]
        driver.pipe("in", _event("z", 5_000, 1), key=b"z")
        assert _closed(driver)[2:] == [(b"a", [1000, 12], 1_999), (b"c", [1000, 1], 1_999)]
        assert len(_closed(driver)) == 4  # nothing closed twice
        assert driver.clock.now_ms == 0  # the wall clock never moved
    finally:
        driver.close()


def test_the_idle_policy_closes_windows_on_a_quiet_partition_reproducibly(tmp_path: Path) -> None:
    topology = _window_topology()
    live = TopologyTestDriver(topology, tmp_path / "live", wall_ms=0, tick_topic="ticks",
                              idle_ms=5_000)  # fmt: skip
    try:
        live.pipe("in", _event("a", 100, 3), key=b"a", timestamp=100)
        assert live.advance_wall_clock(4_000) == []  # not idle long enough
        out = live.advance_wall_clock(2_000)  # idle 6 s: stream time -> 100 + 6000 - 5000
        assert [(o.topic, o.value) for o in out] == [
            ("ticks", b"1100"),
            ("closed", json.dumps([0, 3]).encode()),
        ]
        assert live.stream_time() == 1_100
        assert live.advance_wall_clock(1_000) == []  # one tick per idle_ms at most
        recorded = [o for o in live.emitted if o.topic == "ticks"]
    finally:
        live.close()
    # A replay of the recorded input (the tick included) closes the same window without its
    # wall clock moving: the tick is input, not a decision of the replaying process.
    replay = TopologyTestDriver(topology, tmp_path / "replay", wall_ms=10**12, tick_topic="ticks")
    try:
        replay.pipe("in", _event("a", 100, 3), key=b"a", timestamp=100)
        for tick in recorded:
            replay.pipe("ticks", tick.value, partition=tick.partition, timestamp=tick.timestamp)
        assert replay.outputs("closed") == [o for o in live.emitted if o.topic == "closed"]
    finally:
        replay.close()


def test_a_timer_and_a_window_fire_after_an_aborted_attempt(driver_dir: Path) -> None:
    """An attempt that fired a timer and closed a window, then failed to commit, leaves
    them due: the attempt that commits fires and closes them (none is lost, none doubled)."""
    topology = _window_topology()
    agent = topology.builder("sum")

    @agent.timer("t", "sums", PunctuationType.STREAM_TIME)
    def fired(ctx: ProcessorContext, key: bytes, due: int) -> None:
        ctx.send("fired", key, str(due).encode())

    def arm(ctx: ProcessorContext, now: int) -> None:
        if now < 1_000:
            ctx.timers("t").set(b"k", 500)

    agent.schedule(100, PunctuationType.STREAM_TIME, name="arm")(arm)
    driver = TopologyTestDriver(topology, driver_dir)
    try:
        driver.pipe("in", _event("a", 100, 3), key=b"a")
        driver.pipe("in", _event("a", 2_000, 1), key=b"a", aborts=2)
        assert [(o.key, o.value) for o in driver.outputs("fired")] == [(b"k", b"500")]
        assert _closed(driver) == [(b"a", [0, 3], 999)]
        driver.pipe("in", _event("a", 3_500, 1), key=b"a")
        assert len(driver.outputs("fired")) == 1 and len(_closed(driver)) == 2
    finally:
        driver.close()
