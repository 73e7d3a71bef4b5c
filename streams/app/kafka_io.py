"""Small Kafka reading helpers shared by the operator commands, the demo and the tests.

Everything reads with `isolation_level="read_committed"`: what paysaga's outputs mean is
what a committed reader sees, never records of aborted transactions.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord


def consumer(bootstrap: str, isolation: str = "read_committed", **kw: Any) -> AIOKafkaConsumer:
    """A group-less consumer, read_committed unless asked (assign partitions yourself)."""
    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level=isolation,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=100,
        **kw,
    )


async def partitions(
    c: AIOKafkaConsumer, topic: str, timeout: float = 15.0
) -> list[TopicPartition]:
    """The topic's partitions, waiting (with a deadline) for a just-created topic.

    A consumer's metadata can miss a topic created moments ago; the admin client's
    DescribeTopics asks the controller-fed metadata directly, so it is polled instead.
    """
    parts = c.partitions_for_topic(topic)
    if parts:
        return [TopicPartition(topic, p) for p in sorted(parts)]
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=c._client._bootstrap_servers)
    await admin.start()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            described = await admin.describe_topics([topic])
            found = [d for d in described if d.get("error_code", 0) == 0 and d["partitions"]]
            if found:
                return [TopicPartition(topic, p["partition"]) for p in found[0]["partitions"]]
            if loop.time() > deadline:
                return []
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


async def read_all(
    bootstrap: str, *topics: str, timeout: float = 60.0, isolation: str = "read_committed"
) -> list[ConsumerRecord]:
    """Every committed record of `topics`, from the beginning to the end as of now.

    `isolation="read_uncommitted"` also returns records of aborted transactions (tests use
    it to prove an abort happened and that committed readers do not see it).
    """
    records = iter_records(bootstrap, *topics, follow=False, timeout=timeout, isolation=isolation)
    return [r async for r in records]


async def iter_records(
    bootstrap: str,
    *topics: str,
    follow: bool = True,
    timeout: float | None = None,
    isolation: str = "read_committed",
) -> AsyncIterator[ConsumerRecord]:
    """Committed records of `topics` from the beginning; `follow=False` stops at today's end."""
    c = consumer(bootstrap, isolation)
    await c.start()
    try:
        tps = [tp for t in topics for tp in await partitions(c, t)]
        if not tps:
            raise RuntimeError(f"no partitions for {topics}: were the topics created?")
        async for r in _read(c, tps, follow, timeout, str(topics)):
            yield r
    finally:
        await c.stop()


async def iter_partitions(
    bootstrap: str, tps: list[TopicPartition], timeout: float | None = None
) -> AsyncIterator[ConsumerRecord]:
    """Committed records of these partitions, from their beginning to today's end (one
    payment's partition of each topic, for its history or a replay's state)."""
    c = consumer(bootstrap)
    await c.start()
    try:
        async for r in _read(c, tps, False, timeout, str(sorted({tp.topic for tp in tps}))):
            yield r
    finally:
        await c.stop()


async def _read(c: AIOKafkaConsumer, tps: list[TopicPartition], follow: bool,
                timeout: float | None, what: str) -> AsyncIterator[ConsumerRecord]:  # fmt: skip
    c.assign(tps)
    for tp, offset in (await c.beginning_offsets(tps)).items():
        c.seek(tp, offset)  # explicit: seek_to_beginning can lose to the initial reset
    end = await c.end_offsets(tps) if not follow else {}
    remaining = {tp for tp in tps if not follow and end[tp] > 0}
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while follow or remaining:
        if deadline is not None and loop.time() > deadline:
            raise TimeoutError(f"reading {what} did not reach the end in {timeout}s")
        batch = await c.getmany(timeout_ms=200, max_records=5000)
        for tp, records in batch.items():
            for r in records:
                if follow or r.offset < end[tp]:
                    yield r
            if not follow and await c.position(tp) >= end[tp]:
                remaining.discard(tp)
        if not follow:
            for tp in list(remaining):
                if await c.position(tp) >= end[tp]:
                    remaining.discard(tp)
