"""A pipeline for the exactly-once tests, run by the real worker through `Settings.topology`.

It reads `eos.in`, folds amounts per key into the `totals` table, and writes each input to
`eos.out.a` (same key, 3 partitions, never read by the worker) and to `eos.out.b` (keyed by
sequence number, 5 partitions: another partition count than the input). A value b"POISON"
makes the agent raise; {"huge": true} makes it emit an output the producer refuses.
"""

from __future__ import annotations

import asyncio
import json

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import ConsumerRecord

from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import Topics, changelog_topic
from paysaga.streams.engine import ProcessorContext, PunctuationType, Topology

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


def create_topics(settings: Settings) -> None:
    source, out_a, out_b = names(settings)
    specs = [
        (source, 3, {}),
        (out_a, 3, {}),
        (out_b, 5, {}),
        (Topics(settings.topic_prefix).dlq, 3, {}),
        (changelog_topic(settings, TOTALS), 3, {"cleanup.policy": "compact"}),
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
