"""The first real path end to end: Avro in, payments table, status out, poison to the DLQ."""

from __future__ import annotations

import asyncio
import shutil

from aiokafka import AIOKafkaProducer

from paysaga.schemas.codec import AvroCodec
from paysaga.schemas.registry import SchemaRegistry
from paysaga.streams.app.kafka_io import read_all
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import Topics
from paysaga.streams.engine.deadletter import H_KIND, H_OFFSET, H_REASON, H_TOPIC, parse_headers
from tests.samples import initiated
from tests.support import wait_for

CODEC = AvroCodec(SchemaRegistry())


def _send(settings: Settings, items: list[tuple[bytes, bytes]]) -> None:
    async def go() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, enable_idempotence=True)
        await producer.start()
        try:
            topic = Topics(settings.topic_prefix).initiated
            for key, value in items:
                await producer.send(topic, value, key=key)
            await producer.flush()
        finally:
            await producer.stop()

    asyncio.run(go())


def _statuses(settings: Settings) -> list[dict]:
    records = asyncio.run(read_all(settings.bootstrap, Topics(settings.topic_prefix).status))
    return [CODEC.decode(r.value, "PaymentStatusChanged") for r in records]


def _dead_letters(settings: Settings) -> list:
    return asyncio.run(read_all(settings.bootstrap, Topics(settings.topic_prefix).dlq))


def _encode(event: dict) -> tuple[bytes, bytes]:
    return event["payment_id"].encode(), CODEC.encode("PaymentInitiated", event)


def test_poison_goes_to_dlq_and_good_events_flow(worker_factory, topics: Settings) -> None:
    worker = worker_factory().start()
    good = initiated(40)
    pan = "4111111111111111"
    unknown_fp = b"\xc3\x01" + b"\x01\x02\x03\x04\x05\x06\x07\x08" + b"\x00" * 20
    poison = [
        (b"garbage", b"\x13\x37 this is not avro at all"),
        (b"unknown-fp", unknown_fp),
        _encode({**good[0], "payment_id": "neg", "amount_minor": -500}),
        _encode({**good[1], "payment_id": "huge", "amount_minor": 10**18}),
        _encode({**good[2], "payment_id": "cur", "currency": "ZZZ"}),
        _encode({**good[3], "payment_id": "pan", "card_token": pan}),
    ]
    # Poison interleaved with good events, on every partition (keys spread them).
    items = [_encode(e) for e in good[:20]] + poison + [_encode(e) for e in good[20:]]
    _send(topics, items)

    statuses = wait_for(
        lambda: (s := _statuses(topics)) and len(s) >= 40 and s, 90, what="40 status events"
    )
    letters = wait_for(
        lambda: (d := _dead_letters(topics)) and len(d) >= 6 and d, 60, what="6 dead letters"
    )

    assert sorted(s["payment_id"] for s in statuses) == sorted(e["payment_id"] for e in good)
    assert {s["status"] for s in statuses} == {"INITIATED"}
    assert not any(s["replay"] for s in statuses)
    # Typed emits carry their input's event time as the Kafka timestamp, not the send time.
    raw = asyncio.run(read_all(topics.bootstrap, Topics(topics.topic_prefix).status))
    occurred = {e["payment_id"]: e["occurred_at"] for e in good}
    assert all(r.timestamp == occurred[r.key.decode()] for r in raw)
    by_key = {r.key: parse_headers(r.headers) for r in letters}
    assert len(letters) == 6
    assert by_key[b"garbage"][H_KIND] == "decode"
    assert by_key[b"unknown-fp"][H_KIND] == "decode"
    assert "fingerprint" in by_key[b"unknown-fp"][H_REASON]
    assert "negative" in by_key[b"neg"][H_REASON]
    assert "exceeds" in by_key[b"huge"][H_REASON]
    assert "ZZZ" in by_key[b"cur"][H_REASON]
    assert by_key[b"pan"][H_KIND] == "validation"
    for h in by_key.values():
        assert pan not in h[H_REASON]
        assert h[H_TOPIC] == Topics(topics.topic_prefix).initiated and int(h[H_OFFSET]) >= 0
    # The original bytes are kept for redrive.
    assert {r.value for r in letters} == {v for _, v in poison}

    code, body = worker.get(f"/payments/{good[5]['payment_id']}/")
    assert code == 200 and body["amount_minor"] == good[5]["amount_minor"]
    assert body["status"] == "INITIATED" and isinstance(body["amount_minor"], int)
    assert worker.get("/payments/does-not-exist/")[0] == 404
    assert worker.get("/table/payments/")[0] == 404  # Faust's built-in dumps are off


def test_state_survives_restart_and_is_restored_from_changelog(
    worker_factory, topics: Settings
) -> None:
    events = initiated(30, seed=11)
    _send(topics, [_encode(e) for e in events])
    worker = worker_factory().start()
    wait_for(lambda: len(_statuses(topics)) >= 30, 90, what="30 statuses")
    probe = events[-1]["payment_id"]

    def stored() -> dict | None:
        code, body = worker.get(f"/payments/{probe}/")
        return body if code == 200 else None

    before = wait_for(stored, 30, what="payment in the table")
    assert worker.stop() == 0

    worker.start()
    assert stored() == before  # from the local RocksDB state

    worker.stop()
    state = topics.data_dir
    assert any(state.rglob("*.sst")) or any(state.rglob("CURRENT")), "no RocksDB files found"
    shutil.rmtree(state)
    worker.start()
    assert stored() == before  # rebuilt from the changelog topic

    # A replayed request after the restore is recognised: state unchanged, replay emitted.
    _send(topics, [_encode({**events[0], "event_id": "5f0b8d3c-0000-4000-8000-000000000001"})])
    replays = wait_for(lambda: [s for s in _statuses(topics) if s["replay"]], 60, what="replay")
    assert replays[0]["payment_id"] == events[0]["payment_id"]
