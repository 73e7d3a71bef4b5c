"""Pipelines for the exactly-once tests, run by the real worker through `Settings.topology`.

The fold reads `eos.in`, folds amounts per key into the `totals` table, and writes each
input to `eos.out.a` (same key, 3 partitions, never read by the worker) and to `eos.out.b`
(keyed by sequence number, 5 partitions: another partition count than the input). A value
b"POISON" makes the agent raise; {"huge": true} makes it emit an output the producer
refuses. `window_topology` runs event-time windows over the same topics
(tests/e2e/streams/engine/test_e2e_windows.py).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import ConsumerRecord

from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import Topics, changelog_topic
from paysaga.streams.engine import ProcessorContext, PunctuationType, Topology
from paysaga.tables.windows import Window, Windows

TOTALS = "totals"


def names(settings: Settings) -> tuple[str, str, str]:
    p = settings.topic_prefix
    return p + "eos.in", p + "eos.out.a", p + "eos.out.b"


def fold_topology(settings: Settings) -> Topology:
    source, out_a, out_b = names(settings)
    topology = Topology()

    @topology.agent("fold", sources=[source], tables=[TOTALS])
    def fold(ctx: ProcessorContext, record: ConsumerRecord) -> None:
        if record.value == b"POISON":
            raise ValueError("this record always fails")
        event = json.loads(record.value)
        table = ctx.table(TOTALS)
        current = table.get(record.key)
        total, count = json.loads(current) if current else (0, 0)
        total, count = total + event["amount"], count + 1
        table.set(record.key, json.dumps([total, count]).encode())
        out = json.dumps(
            {"seq": event["seq"], "key": record.key.decode(), "total": total, "count": count}
        ).encode()
        ctx.send(out_a, record.key, out)
        ctx.send(out_b, str(event["seq"]).encode(), out)
        if event.get("huge"):
            ctx.send(out_a, record.key, b"x" * 2_000_000)  # over max_request_size: refused

    return topology


def flaky_timer_topology(settings: Settings) -> Topology:
    """The fold pipeline plus a wall-clock schedule that raises on its very first run."""
    topology = fold_topology(settings)
    runs = []
    fold = topology.builder("fold")

    @fold.schedule(10, PunctuationType.WALL_CLOCK)
    def timer(ctx: ProcessorContext, now_ms: int) -> None:
        runs.append(now_ms)
        if len(runs) == 1:
            raise RuntimeError("a timer bug that happens once")

    return topology


WINDOWS = "wsum"
WINDOW_MS = 100


def window_topology(settings: Settings) -> Topology:
    """Sums per key in tumbling 100 ms event-time windows (no grace): each closed window to
    `eos.out.a`, each late input (its window already closed) to `eos.out.b`. Inputs are JSON
    {"seq", "amount", "ts"}; the event time is "ts"."""
    source, out_a, out_b = names(settings)
    topology = Topology()

    def decode(record: ConsumerRecord) -> dict:
        return dict(json.loads(record.value))

    @topology.agent("windows", sources=[source], tables=[WINDOWS], decode=decode,
                    event_time=lambda e: e["ts"])  # fmt: skip
    def add(ctx: ProcessorContext, event: dict) -> None:
        record = ctx.record
        assert record is not None and record.key is not None

        def fold(window: Window, current: bytes | None) -> bytes:
            total, count = json.loads(current) if current else (0, 0)
            return json.dumps([total + event["amount"], count + 1]).encode()

        for window in ctx.window(WINDOWS).update(record.key, fold):
            late = {"seq": event["seq"], "key": record.key.decode(), "start": window.start}
            ctx.send(out_b, record.key, json.dumps(late).encode())

    @add.window(WINDOWS, WINDOWS, Windows.tumbling(WINDOW_MS))
    def closed(ctx: ProcessorContext, window: Window, value: bytes) -> None:
        total, count = json.loads(value)
        result = {"key": window.key.decode(), "start": window.start, "total": total,
                  "count": count}  # fmt: skip
        ctx.send(out_a, window.key, json.dumps(result).encode())

    return topology


def create_topics(settings: Settings) -> None:
    source, out_a, out_b = names(settings)
    compact = {"cleanup.policy": "compact"}
    specs = [
        (source, 3, {}),
        (out_a, 3, {}),
        (out_b, 5, {}),
        (Topics(settings.topic_prefix).dlq, 3, {}),
        (Topics(settings.topic_prefix).stream_time, 3, {}),
        (Topics(settings.topic_prefix).journal, 3, {}),
        (changelog_topic(settings, TOTALS), 3, compact),
        (changelog_topic(settings, WINDOWS), 3, compact),
    ]

    async def go() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
        await admin.start()
        try:
            await admin.create_topics(
                [
                    NewTopic(name=n, num_partitions=p, replication_factor=1, topic_configs=c)
                    for n, p, c in specs
                ]
            )
        finally:
            await admin.close()

    asyncio.run(go())


def refusing_saga_topology(settings: Settings) -> Topology:
    """paysaga's topology, with a saga that raises on every input of one payment (the
    environment's TEST_REFUSE_PAYMENT): code that refuses records the live run processed."""
    import os
    from dataclasses import replace

    from paysaga.streams.app.topology import paysaga_topology

    topology = paysaga_topology(settings)
    builder = topology.builder("paysaga.saga")
    target, process = os.environ["TEST_REFUSE_PAYMENT"], builder.agent.process

    def refusing(ctx: ProcessorContext, value: Any) -> None:
        if getattr(value[1], "payment_id", None) == target:
            raise ValueError(f"this code refuses {target}")
        process(ctx, value)

    builder.agent = replace(builder.agent, process=refusing)
    return topology
