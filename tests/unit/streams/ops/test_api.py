"""The payments API's decisions, without a broker: what a body may hold, how a key and a
wait are read, and what a write answers when the saga decides otherwise than the API
expected (a racing body under the same key, a state that changed).

The committed state a worker would read is a dict here (`States`), and the writer records
what it would send and lets a test play the saga's decision; the end-to-end behaviour
through the broker is tests/e2e/streams/ops/test_e2e_api.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from paysaga.domain.card import TooDeep, card_data_paths
from paysaga.domain.payment import Payment, PaymentStatus, SagaState
from paysaga.schemas.codec import AvroCodec
from paysaga.schemas.registry import SchemaRegistry
from paysaga.streams.app.settings import Settings
from paysaga.streams.ops.api import (
    ApiWriter,
    PaymentsApi,
    Refused,
    key_of,
    parse_body,
    payment_id_for,
    wait_ms,
)
from paysaga.streams.ops.api_models import CaptureBody, CreatePayment
from paysaga.streams.ops.routing import Answer, Render

PAN = "4111111111111111"
T0 = 1_700_000_000_000


class States:
    """Committed state by key, rendered as the owner's view would render it."""

    def __init__(self) -> None:
        self.values: dict[bytes, bytes] = {}

    def get(self, key: bytes) -> bytes | None:
        return self.values.get(key)


class LocalRouter:
    """Every key served here, from `States` (the routing itself: test_routing.py)."""

    def __init__(self, states: States) -> None:
        self.states = states

    async def read(self, key: bytes, table: str, render: Render, path: str,
                   request: Any = None) -> Answer:  # fmt: skip
        status, body = render(self.states)  # type: ignore[arg-type]
        return Answer(status, body, {})


class PlayedWriter(ApiWriter):
    """Records each write and lets the test play what the saga then commits."""

    def __init__(self, on_send: Callable[[str, bytes], None]) -> None:
        super().__init__("unused:9092")
        self.sent: list[tuple[str, bytes]] = []
        self.on_send = on_send

    async def send(self, topic: str, key: bytes, value: bytes, partition: int) -> None:
        self.sent.append((topic, key))
        self.on_send(topic, key)


def authorized(pid: str = "pay_1") -> Payment:
    return Payment(
        payment_id=pid, merchant_id="m_1", customer_id="c_1", order_id="o_1",
        idempotency_key="k", amount_minor=1000, currency="EUR", capture_mode="MANUAL",
        card_token="tok_1", status=PaymentStatus.AUTHORIZED, authorized_minor=1000,
        saga=SagaState(kind="PAYMENT", awaiting_request=True), created_at=T0, updated_at=T0,
    )  # fmt: skip


def api(states: States, on_send: Callable[[str, bytes], None]) -> tuple[PaymentsApi, PlayedWriter]:
    writer = PlayedWriter(on_send)
    settings = Settings(api_max_wait_ms=2_000)
    router = LocalRouter(states)
    return PaymentsApi(settings, router, writer, AvroCodec(SchemaRegistry())), writer  # type: ignore[arg-type]


def store(states: States, p: Payment) -> None:
    states.values[p.payment_id.encode()] = p.to_json()


def test_card_data_paths_name_keys_never_values() -> None:
    assert card_data_paths({"card": {"number": "x", "cvc": "1", "exp_year": 1}}) == [
        "card.number", "card.cvc", "card.exp_year"]  # fmt: skip
    assert card_data_paths({"reason": f"lost card {PAN[:4]} {PAN[4:8]} {PAN[8:12]} {PAN[12:]}"})
    found = card_data_paths({"metadata": {PAN: PAN}})
    assert found and all(PAN not in f for f in found)
    assert card_data_paths({"order_id": "ord_1", "amount_minor": 4111111111111111}) == []
    deep: Any = "x"
    for _ in range(40):
        deep = [deep]
    with pytest.raises(TooDeep):
        card_data_paths({"a": deep})


def test_a_body_with_card_data_or_nested_too_deep_is_refused_without_echo() -> None:
    for raw in (json.dumps({"reason": f"card {PAN}"}).encode(), b"[" * 100_000,
                json.dumps({"metadata": {PAN: "1"}}).encode()):  # fmt: skip
        with pytest.raises(Refused) as exc:
            parse_body(raw, CaptureBody)
        assert exc.value.reply.status == 400
        assert PAN not in exc.value.reply.body.model_dump_json()
    with pytest.raises(Refused) as exc:
        parse_body(b'{"amount_minor": 10.5, "extra": 1}', CaptureBody)
    fields = [f.field for f in exc.value.reply.body.fields]  # type: ignore[attr-defined]
    assert fields == ["amount_minor", "extra"]


def test_keys_and_waits_are_read_strictly() -> None:
    assert key_of({"Idempotency-Key": "k-1"}) == "k-1"
    for bad in ({}, {"Idempotency-Key": ""}, {"Idempotency-Key": "x" * 256},
                {"Idempotency-Key": f"ord-{PAN}"}):  # fmt: skip
        with pytest.raises(Refused):
            key_of(bad)
    assert wait_ms({}, 100) == 0 and wait_ms({"wait": "100"}, 100) == 100
    for text in ("101", "²", "-1", "1.5", "abc"):
        with pytest.raises(Refused):
            wait_ms({"wait": text}, 100)


def test_a_create_s_payment_is_its_key_and_body() -> None:
    assert payment_id_for("m", "k", "fp1") == payment_id_for("m", "k", "fp1")
    # A key reused with another body (after its lifetime) names another payment.
    assert payment_id_for("m", "k", "fp1") != payment_id_for("m", "k", "fp2")
    assert payment_id_for("m", "k", "fp1") != payment_id_for("m2", "k", "fp1")


def test_the_create_body_is_payment_initiated_without_envelope_or_key() -> None:
    fields = set(CreatePayment.model_fields)
    assert {"merchant_id", "amount_minor", "currency", "card_token"} <= fields
    assert not fields & {"event_id", "occurred_at", "payment_id", "idempotency_key"}


def captured_by(states: States, key: str, fp: str, amount: int) -> Callable[[str, bytes], None]:
    """A write hook: as the API's write lands, another capture (`key`, body `fp`) of
    `amount` has won the race, and the payment's committed state says so."""

    def won(topic: str, k: bytes) -> None:
        p = authorized()
        p.requests[key] = fp
        p.status, p.captured_minor, p.saga.awaiting_request = PaymentStatus.CAPTURED, amount, False  # type: ignore[union-attr]
        store(states, p)

    return won


def test_a_capture_that_lost_the_race_for_its_key_is_409_not_the_winner_s_answer() -> None:
    states = States()
    store(states, authorized())

    a, writer = api(states, captured_by(states, "cap-1", "fingerprint-of-another-body", 500))
    reply = asyncio.run(a.request("capture", "pay_1", {"Idempotency-Key": "cap-1"},
                                  b'{"amount_minor": 800}', {"wait": "2000"}))  # fmt: skip
    assert len(writer.sent) == 1
    assert reply.status == 409 and reply.body.code == "idempotency_conflict"  # type: ignore[attr-defined]


def test_a_capture_the_saga_refused_meanwhile_ends_the_wait_with_409() -> None:
    states = States()
    store(states, authorized())

    a, _ = api(states, captured_by(states, "cap-other", "f", 1000))
    loop_time = asyncio.new_event_loop()
    try:
        started = loop_time.time()
        reply = loop_time.run_until_complete(a.request(
            "capture", "pay_1", {"Idempotency-Key": "cap-1"}, b"{}", {"wait": "2000"}))  # fmt: skip
        took = loop_time.time() - started
    finally:
        loop_time.close()
    assert reply.status == 409 and reply.body.code == "unexpected_state"  # type: ignore[attr-defined]
    assert took < 1.5  # decided when the state said so, not when the wait ran out


def test_a_replayed_capture_writes_nothing_and_another_body_is_409() -> None:
    states = States()
    a, writer = api(states, lambda t, k: None)
    store(states, authorized())
    first = asyncio.run(a.request("capture", "pay_1", {"Idempotency-Key": "cap-1"}, b"{}", {}))
    assert first.status == 202 and len(writer.sent) == 1
    # The saga recorded it (the fingerprint the API computes for the same body).
    from paysaga.domain.idempotency import fingerprint
    from paysaga.schemas import events as ev

    p = authorized()
    req = ev.PaymentRequest(event_id="00000000-0000-4000-8000-000000000000", occurred_at=T0,
                            payment_id="pay_1", correlation_id="o_1",
                            request_type=ev.RequestType.CAPTURE, idempotency_key="cap-1",
                            merchant_id="m_1")  # fmt: skip
    p.requests["cap-1"] = fingerprint(req.model_dump(mode="json"))
    store(states, p)
    again = asyncio.run(a.request("capture", "pay_1", {"Idempotency-Key": "cap-1"}, b"{}", {}))
    assert again.status == 202 and again.body.replayed and len(writer.sent) == 1  # type: ignore[attr-defined]
    other = asyncio.run(a.request("capture", "pay_1", {"Idempotency-Key": "cap-1"},
                                  b'{"amount_minor": 10}', {}))  # fmt: skip
    assert other.status == 409 and len(writer.sent) == 1
    # The same key as a refund is another request under a used key: 409 too.
    refund = asyncio.run(a.request("refund", "pay_1", {"Idempotency-Key": "cap-1"}, b"{}", {}))
    assert refund.status == 409 and len(writer.sent) == 1


def test_unknown_or_impossible_ids_are_404_and_never_echo_a_card_number() -> None:
    a, _ = api(States(), lambda t, k: None)
    for pid in (PAN, "x" * 65, "pay_nobody"):
        reply = asyncio.run(a.get(pid))
        assert reply.status == 404 and PAN not in reply.body.model_dump_json()


def test_an_answer_that_is_not_the_view_s_own_404_is_not_taken_for_unknown() -> None:
    assert PaymentsApi._found(Answer(404, b'{"error": "x", "code": "not_found"}', {})) is None
    for answer, status in ((Answer(404, b"404: Not Found", {}), 502),
                           (Answer(503, b"<html>busy</html>", {}), 503),
                           (Answer(500, b"", {}), 502)):  # fmt: skip
        with pytest.raises(Refused) as exc:
            PaymentsApi._found(answer)
        assert exc.value.reply.status == status
    with pytest.raises(Refused) as exc:
        PaymentsApi._found(Answer(503, b"{}", {}))
    assert exc.value.reply.headers["Retry-After"]


def test_a_write_kafka_does_not_take_is_503_and_the_writer_can_close() -> None:
    async def go() -> None:
        writer = ApiWriter("127.0.0.1:1")  # nothing listens there
        with pytest.raises(Refused) as exc:
            await asyncio.wait_for(writer.send("t", b"k", b"v", 0), 60)
        assert exc.value.reply.status == 503 and exc.value.reply.headers["Retry-After"]
        await writer.close()
        with pytest.raises(Refused):
            await writer.send("t", b"k", b"v", 0)  # closed: never a new producer

    asyncio.run(go())
