"""Avro through a real Kafka topic: both framings, and an old writer read by the new reader."""

from __future__ import annotations

import asyncio
import json
from importlib import resources

from aiokafka import AIOKafkaProducer

from paysaga.schemas.codec import AvroCodec
from paysaga.schemas.registry import SchemaRegistry
from paysaga.streams.app.kafka_io import read_all
from paysaga.streams.app.settings import Settings
from tests.samples import initiated

CONFLUENT_ID = 17


def _codec() -> AvroCodec:
    return AvroCodec(SchemaRegistry(id_map={CONFLUENT_ID: "PaymentInitiated"}))


def _old_writer_bytes(event: dict) -> bytes:
    """Single-object bytes written with the previous released PaymentInitiated (v1)."""
    text = resources.files("paysaga.schemas").joinpath("history/PaymentInitiated.v1.avsc")
    v1 = json.loads(text.read_text())
    fields = {f["name"] for f in v1["fields"]}
    codec = _codec()
    old = {k: v for k, v in event.items() if k in fields}
    from paysaga.schemas.registry import Schema

    return codec.encode_with(Schema(v1), old)


def test_round_trip_both_framings_and_old_writer(topics: Settings) -> None:
    codec = _codec()
    events = initiated(3)
    topic = topics.topic_prefix + "payment.initiated"
    payloads = [
        codec.encode("PaymentInitiated", events[0]),
        codec.encode_confluent("PaymentInitiated", events[1], CONFLUENT_ID),
        _old_writer_bytes(events[2]),
    ]
    assert payloads[0][:2] == b"\xc3\x01" and payloads[1][:1] == b"\x00"

    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=topics.bootstrap, enable_idempotence=True)
        await producer.start()
        try:
            for e, p in zip(events, payloads, strict=True):
                await producer.send_and_wait(topic, p, key=e["payment_id"].encode(), partition=0)
        finally:
            await producer.stop()

    asyncio.run(send())
    records = asyncio.run(read_all(topics.bootstrap, topic))
    decoded = [codec.decode(r.value, "PaymentInitiated") for r in records]
    assert [d["payment_id"] for d in decoded] == [e["payment_id"] for e in events]
    assert decoded[0]["amount_minor"] == events[0]["amount_minor"]
    assert decoded[1] == events[1]
    # The v1 writer had no device_id/metadata/description: the reader fills the defaults.
    assert decoded[2]["device_id"] is None and decoded[2]["metadata"] == {}
    assert decoded[2]["amount_minor"] == events[2]["amount_minor"]
