"""The engine's replay hooks through a real broker: an isolated application reads the live
inputs between given start and stop offsets, writes only its own prefixed topics, and
leaves every live topic exactly as it was.

A live worker runs the payment topology over N payments. Then a second application
(another app id, group, state and topic prefix; the live input prefix) runs in-process
from offset 2 of each live payment.initiated partition up to two records before its end.
It reproduces exactly the live status records of those inputs (same deterministic ids),
finishes, and not one record was added to any live topic.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from aiokafka.structs import TopicPartition

from paysaga.schemas.codec import AvroCodec
from paysaga.schemas.registry import SchemaRegistry
from paysaga.streams.app.assembly import create_engine
from paysaga.streams.app.kafka_io import read_all
from paysaga.streams.app.topics import Topics, create_topics
from paysaga.streams.dev.broker import LocalBroker
from paysaga.streams.engine import StartAt
from tests.saga_support import World
from tests.samples import initiated
from tests.support import WorkerProcess, end_offsets, isolated_settings, topic_names, wait_for

CODEC = AvroCodec(SchemaRegistry())


def _statuses(bootstrap: str, topic: str) -> dict[str, dict]:
    records = asyncio.run(read_all(bootstrap, topic))
    return {s["event_id"]: s for s in (CODEC.decode(r.value, "PaymentStatusChanged")
                                       for r in records)}  # fmt: skip


def test_a_replay_reads_live_inputs_between_offsets_and_writes_only_its_own(
    broker: LocalBroker, tmp_path: Path
) -> None:
    live = isolated_settings(broker.bootstrap, tmp_path / "live", "live", idle_ms=200)
    asyncio.run(create_topics(live))
    names = Topics(live.topic_prefix)
    world = World(live)
    events = initiated(30, seed=21)
    worker = WorkerProcess(live, tmp_path / "live.log").start()
    try:
        for event in events:
            world.initiate(event)
        wait_for(lambda: len(world.statuses()) >= len(events), 60, what="live statuses")
        # Idle now: the live worker writes stream-time ticks, which the replay reads as input
        # (a transactional topic: its end offset lies past its last record).
        wait_for(lambda: worker.get("/ready/")[1]["stats"]["ticks"] >= 3, 30, what="ticks")
    finally:
        worker.stop()
    mine = (live.topic_prefix, live.app_id + "-")
    live_topics = [t for t in asyncio.run(topic_names(live.bootstrap)) if t.startswith(mine)]
    before = asyncio.run(end_offsets(live.bootstrap, live_topics))

    # Inputs read: offsets [2, end - 2) of each live payment.initiated partition; every other
    # live input up to its end as of now.
    ends = asyncio.run(end_offsets(live.bootstrap, list(names.inputs)))
    initiated_tps = [tp for tp in ends if tp.topic == names.initiated]
    assert all(ends[tp] >= 5 for tp in initiated_tps), "too few inputs on a partition"
    start = {tp: StartAt(offset=2) for tp in initiated_tps}
    stop = {tp: (end - 2 if tp.topic == names.initiated else end) for tp, end in ends.items()}
    replay = live.model_copy(update={
        "app_id": "replay-live-1", "topic_prefix": "replay1.", "input_topic_prefix": "live.",
        "data_dir": tmp_path / "replay",
    })  # fmt: skip
    asyncio.run(create_topics(replay))
    chosen = asyncio.run(read_all(live.bootstrap, names.initiated))
    wanted = {CODEC.decode(r.value, "PaymentInitiated")["event_id"] for r in chosen
              if 2 <= r.offset < stop[TopicPartition(r.topic, r.partition)]}  # fmt: skip
    replay_status = Topics(replay.topic_prefix).status

    async def run_replay() -> dict[str, float]:
        engine = create_engine(replay, start=start, stop=stop)
        await engine.start()
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 90
            while not (
                await engine.finished()
                and len(await read_all(live.bootstrap, replay_status)) >= len(wanted)
            ):
                assert loop.time() < deadline, (
                    f"replay did not finish: {engine.failed}, {dict(engine.stats)}"
                )
                await asyncio.sleep(0.2)  # polling the engine's progress, with a deadline
            return dict(engine.stats)
        finally:
            await engine.stop()

    stats = asyncio.run(run_replay())
    after = asyncio.run(end_offsets(live.bootstrap, live_topics))
    assert after == before, "the replay wrote to a live topic"
    assert stats["ticks"] == 0  # a bounded run writes no idle ticks of its own

    live_statuses = _statuses(live.bootstrap, names.status)
    replayed = _statuses(live.bootstrap, replay_status)
    expected = {i: s for i, s in live_statuses.items() if s["causation_id"] in wanted}
    assert replayed.keys() == expected.keys()
    assert all(json.dumps(replayed[i], sort_keys=True) == json.dumps(expected[i], sort_keys=True)
               for i in expected)  # fmt: skip
    skipped = {e["event_id"] for e in events} - wanted
    assert skipped and not any(s["causation_id"] in skipped for s in replayed.values())
    # The replay's commands stayed on its own topics too.
    assert asyncio.run(read_all(live.bootstrap, Topics(replay.topic_prefix).commands))
