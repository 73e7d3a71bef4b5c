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

from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import Topics, changelog_topic
from paysaga.streams.app.topology import Topology
from paysaga.streams.engine.core import AgentSpec, Context

TOTALS = "totals"


def names(settings: Settings) -> tuple[str, str, str]:
    p = settings.topic_prefix
    return p + "eos.in", p + "eos.out.a", p + "eos.out.b"


def fold_topology(settings: Settings) -> Topology:
    source, out_a, out_b = names(settings)

    def process(ctx: Context, record) -> None:
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

    return Topology([AgentSpec("fold", source, process, (TOTALS,))], (TOTALS,))


def flaky_timer_topology(settings: Settings) -> Topology:
    """The fold pipeline plus a timer that raises on its very first run, then idles."""
    fold = fold_topology(settings)
    runs = []

    def timer(ctx: Context, now_ms: int) -> None:
        runs.append(now_ms)
        if len(runs) == 1:
            raise RuntimeError("a timer bug that happens once")

    return Topology(fold.agents, fold.tables, (timer,))


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
