"""The operator CLI and the web token, as a user runs them, against the real broker."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaProducer

from paysaga.schemas.codec import AvroCodec
from paysaga.schemas.registry import SchemaRegistry
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import Topics, topic_specs
from paysaga.streams.ops.inspection import utc
from tests.samples import initiated
from tests.support import WorkerProcess, paysaga, wait_for


def test_topics_create_twice_is_idempotent(settings: Settings) -> None:
    n = len(topic_specs(settings))  # 34: payment topics, internal topics, changelogs
    first = paysaga(settings, "topics", "create")
    assert first.returncode == 0, first.stderr
    assert f"{n} topics: {n} created, 0 existed" in first.stdout
    for topic in ("paysaga.recon.repartition", "reconciliation.reports", "recon-changelog"):
        assert topic in first.stdout
    second = paysaga(settings, "topics", "create")
    assert f"0 created, {n} existed" in second.stdout


def test_operator_commands_and_web_token(worker_factory, topics: Settings) -> None:
    secured = topics.model_copy(update={"web_token": "s3cret"})
    worker = worker_factory(secured).start()
    codec = AvroCodec(SchemaRegistry())
    event = initiated(1, seed=21)[0]
    # Keyed "p", not by its payment_id: intake must repartition it to find it again.

    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=topics.bootstrap)
        await producer.start()
        try:
            topic = Topics(topics.topic_prefix).initiated
            await producer.send(topic, codec.encode("PaymentInitiated", event), key=b"p")
            await producer.send(topic, b"\x00\x00\x00\x03\xe7 not avro", key=b"bad")
            await producer.flush()
        finally:
            await producer.stop()

    asyncio.run(send())
    pid = event["payment_id"]
    wait_for(lambda: worker.get(f"/payments/{pid}/")[0] == 200, 60, what="payment stored")

    shown = paysaga(secured, "payment", "show", pid)
    assert shown.returncode == 0, shown.stderr
    assert f'"amount_minor": {event["amount_minor"]}' in shown.stdout
    history = paysaga(secured, "payment", "history", pid)
    assert "INITIATED" in history.stdout and "ACCEPTED" in history.stdout
    assert utc(event["occurred_at"]) in history.stdout  # UTC, not epoch millis
    code, trail = worker.get(f"/payments/{pid}/events")
    assert code == 200 and event["event_id"] in [e["event_id"] for e in trail["events"]]

    unauthenticated = topics.model_copy(update={"web_token": None})
    denied = paysaga(unauthenticated, "payment", "show", pid)
    assert denied.returncode == 1 and "401" in denied.stderr
    # /ready/ names failing tasks and engine counters: the token guards it too. /health/
    # stays open and says nothing else.
    anonymous = WorkerProcess(unauthenticated, worker.log)  # the same port, no token
    assert anonymous.get("/ready/") == (401, {"error": "unauthorized", "code": "unauthorized"})
    assert anonymous.get("/health/") == (200, {"status": "ok"})
    code, body = worker.get("/ready/")
    assert code in (200, 503) and "stats" in body

    listing = wait_for(lambda: (r := paysaga(topics, "dlq", "list")) and "1 dead letters" in
                       r.stdout and r, 60, what="dlq list")  # fmt: skip
    assert "unknown-schema-id" in listing.stdout
    ref = listing.stdout.splitlines()[1].split()[0]
    detail = paysaga(topics, "dlq", "show", ref)
    assert "paysaga.error.reason: unknown-schema-id" in detail.stdout
    assert "not avro" not in detail.stdout  # the payload is never printed
