"""`topics create` against the real broker: complete, idempotent, co-partitioned."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import create_topics, describe_configs, topic_specs


def _partition_counts(settings: Settings) -> dict[str, int]:
    async def go() -> dict[str, int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
        await admin.start()
        try:
            names = [s.name for s in topic_specs(settings)]
            return {d["topic"]: len(d["partitions"]) for d in await admin.describe_topics(names)}
        finally:
            await admin.close()

    return asyncio.run(go())


def test_create_every_topic_idempotently(settings: Settings) -> None:
    first = asyncio.run(create_topics(settings))
    assert set(first.values()) == {"created"}
    assert len(first) == len(topic_specs(settings)) >= 21
    second = asyncio.run(create_topics(settings))
    assert set(second.values()) == {"exists"}

    counts = _partition_counts(settings)
    keyed = [s.name for s in topic_specs(settings) if s.key == "payment_id"]
    assert {counts[n] for n in keyed} == {settings.partitions}, counts

    p = settings.topic_prefix
    assert describe_configs_sync(settings, p + "payment.initiated")["retention.ms"] == str(
        7 * 24 * 3600 * 1000
    )
    assert describe_configs_sync(settings, p + "payment.captured")["retention.ms"] == "-1"
    changelog = describe_configs_sync(settings, f"{settings.app_id}-payments-changelog")
    assert changelog["cleanup.policy"] == "compact"


def describe_configs_sync(settings: Settings, name: str) -> dict[str, str]:
    return asyncio.run(describe_configs(settings, name))


def test_existing_topic_with_other_partition_count_is_reported(settings: Settings) -> None:
    async def precreate() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
        await admin.start()
        try:
            await admin.create_topics(
                [
                    NewTopic(
                        name=settings.topic_prefix + "payment.failed",
                        num_partitions=2,
                        replication_factor=1,
                    )
                ]
            )
        finally:
            await admin.close()

    asyncio.run(precreate())
    with pytest.raises(RuntimeError, match=r"payment\.failed: has 2 partitions, declared 3"):
        asyncio.run(create_topics(settings))


def test_an_audit_topic_kept_shorter_than_declared_is_reported(settings: Settings) -> None:
    """A topic that exists with a shorter retention than its declaration (the audit trail,
    replays) is reported by `topics create`, with what it keeps; it is not changed."""
    name = settings.topic_prefix + "payment.status"

    async def precreate() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
        await admin.start()
        try:
            short = NewTopic(name=name, num_partitions=3, replication_factor=1,
                             topic_configs={"retention.ms": "3600000"})  # fmt: skip
            await admin.create_topics([short])
        finally:
            await admin.close()

    asyncio.run(precreate())
    said: list[str] = []
    result = asyncio.run(create_topics(settings, log=said.append))
    assert result[name].startswith("exists, keeps records 3600000 ms")
    assert [line for line in said if name in line and "shorter than declared" in line]
    assert not [k for k, v in result.items() if "shorter" in v and k != name]
    assert describe_configs_sync(settings, name)["retention.ms"] == "3600000"
