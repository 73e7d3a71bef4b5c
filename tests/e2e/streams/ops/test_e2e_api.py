"""The HTTP payments API end to end: a worker, the real broker, the test as the gateway.

Authorize with `?wait`, capture part, refund in parts, cancel; a replayed request returns
the same payment and writes nothing; another body under the same key is 409; a card
number in a body is 400 and appears in no topic, no state file and no log line.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from paysaga.streams.app.kafka_io import read_all
from paysaga.streams.app.topics import Topics, create_topics
from tests.saga_support import World, new_id
from tests.support import WorkerProcess, isolated_settings, wait_for

TOKEN = "api-token"
PAN = "4111111111111111"
#: Long enough for a worker on a loaded machine; the saga answers in milliseconds.
WAIT = "?wait=20000"


@pytest.fixture(scope="module")
def env(broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[World, WorkerProcess]]:
    tmp: Path = tmp_path_factory.mktemp("api")
    settings = isolated_settings(broker.bootstrap, tmp / "state", "api", web_token=TOKEN,
                                 command_timeout_ms=120_000)  # fmt: skip
    asyncio.run(create_topics(settings))
    worker = WorkerProcess(settings, tmp / "worker.log").start()
    yield World(settings), worker
    worker.kill()


def body(**overrides: Any) -> dict[str, Any]:
    return {"merchant_id": "m_api", "customer_id": "c_1", "order_id": f"ord_{new_id()[:8]}",
            "amount_minor": 10_000, "currency": "EUR", "card_token": "tok_visa_abc",
            "card_last4": "4242", "country": "DE", "capture_mode": "MANUAL",
            **overrides}  # fmt: skip


def call(w: WorkerProcess, method: str, path: str, doc: Any = None, key: str | None = None,
         auth: bool = True) -> tuple[int, Any]:  # fmt: skip
    headers = {"Idempotency-Key": key} if key is not None else {}
    code, raw, _ = w.call(method, path, doc, headers, auth=auth, timeout=30)
    return code, json.loads(raw) if raw else None


def in_background(fn: Callable[[], Any]) -> Future:
    pool = ThreadPoolExecutor(1)
    fut = pool.submit(fn)
    pool.shutdown(wait=False)
    return fut


def command_for(world: World, order_id: str, action: str) -> dict[str, Any]:
    """The first `action` command of the payment for `order_id` (its correlation id)."""

    def probe() -> dict[str, Any] | None:
        found = [c for c in world.commands()
                 if c["correlation_id"] == order_id and c["command_type"] == action]  # fmt: skip
        return found[0] if found else None

    return wait_for(probe, 60, what=f"{action} for {order_id}")


def authorized(world: World, w: WorkerProcess, key: str, doc: dict[str, Any]) -> dict[str, Any]:
    """Create with ?wait while the test, as the gateway, authorizes: the 200 answer."""
    fut = in_background(lambda: call(w, "POST", f"/v1/payments{WAIT}", doc, key))
    world.answer(command_for(world, doc["order_id"], "AUTHORIZE"), "AUTHORIZED")
    code, answer = fut.result(60)
    assert code == 200, answer
    return answer


def test_authorize_with_wait_then_replay_and_conflict(env) -> None:
    world, w = env
    key, doc = f"k_{new_id()}", body()
    answer = authorized(world, w, key, doc)
    pid = answer["id"]
    assert answer["answered"] and not answer["replayed"] and answer["operation"] == "create"
    payment = answer["payment"]
    assert payment["status"] == "AUTHORIZED" and payment["authorized_minor"] == 10_000
    assert payment["saga"]["awaiting_capture"] and payment["currency"] == "EUR"

    # The same request again: the same payment, nothing written, no second authorization.
    code, again = call(w, "POST", "/v1/payments", doc, key)
    assert code == 202 and again["id"] == pid and again["replayed"]
    code, again = call(w, "POST", f"/v1/payments{WAIT}", doc, key)
    assert code == 200 and again["replayed"] and again["payment"]["status"] == "AUTHORIZED"
    # Another body under the same key: 409, and still one payment.
    code, err = call(w, "POST", "/v1/payments", {**doc, "amount_minor": 10_001}, key)
    assert code == 409 and err["code"] == "idempotency_conflict" and err["payment_id"] == pid
    initiated = [r for r in asyncio.run(read_all(w.settings.bootstrap, world.t.initiated))
                 if r.key is not None and key.encode() in r.key]  # fmt: skip
    assert len(initiated) == 1
    assert [c["command_type"] for c in world.commands(pid)] == ["AUTHORIZE"]
    code, got = call(w, "GET", f"/v1/payments/{pid}")
    assert code == 200 and got["id"] == pid and got["status"] == "AUTHORIZED"
    code, record = call(w, "GET", f"/idempotency/m_api/{key}")
    assert code == 200 and record["payment_id"] == pid


def test_partial_capture_partial_refunds_and_their_replays(env) -> None:
    world, w = env
    key = f"k_{new_id()}"
    pid = authorized(world, w, key, body())["id"]

    fut = in_background(lambda: call(w, "POST", f"/v1/payments/{pid}/capture{WAIT}",
                                     {"amount_minor": 8_000}, "cap-1"))  # fmt: skip
    capture = world.wait_command(pid, "CAPTURE")
    assert capture["amount_minor"] == 8_000
    world.answer(capture, "CAPTURED")
    code, answer = fut.result(60)
    assert code == 200 and answer["payment"]["status"] == "CAPTURED", answer
    assert answer["payment"]["captured_minor"] == 8_000
    code, again = call(w, "POST", f"/v1/payments/{pid}/capture", {"amount_minor": 8_000}, "cap-1")
    assert code == 202 and again["replayed"]
    code, err = call(w, "POST", f"/v1/payments/{pid}/capture", {"amount_minor": 7_000}, "cap-1")
    assert code == 409 and err["code"] == "idempotency_conflict"

    for n, amount in enumerate((3_000, 2_000), 1):
        path, doc = f"/v1/payments/{pid}/refund{WAIT}", {"amount_minor": amount}
        fut = in_background(functools.partial(call, w, "POST", path, doc, f"ref-{n}"))
        refund = world.wait_command(pid, "REFUND", n=n)
        assert refund["amount_minor"] == amount
        world.answer(refund, "REFUNDED")
        code, answer = fut.result(60)
        assert code == 200, answer
    assert answer["payment"]["refunded_minor"] == 5_000
    assert [r["state"] for r in answer["payment"]["refunds"]] == ["DONE", "DONE"]
    code, err = call(w, "POST", f"/v1/payments/{pid}/refund", {"amount_minor": 3_001}, "ref-3")
    assert code == 409 and err["code"] == "unexpected_state" and "3000" in err["error"]
    code, again = call(w, "POST", f"/v1/payments/{pid}/refund", {"amount_minor": 3_000}, "ref-1")
    assert code == 202 and again["replayed"]
    actions = [c["command_type"] for c in world.commands(pid)]
    assert actions == ["AUTHORIZE", "CAPTURE", "REFUND", "REFUND"]


def test_cancel_voids_the_authorization(env) -> None:
    world, w = env
    pid = authorized(world, w, f"k_{new_id()}", body())["id"]
    fut = in_background(lambda: call(w, "POST", f"/v1/payments/{pid}/cancel{WAIT}",
                                     {"reason": "customer asked"}, "cancel-1"))  # fmt: skip
    world.answer(world.wait_command(pid, "VOID"), "VOIDED")
    code, answer = fut.result(60)
    assert code == 200 and answer["payment"]["saga"]["state"] == "COMPENSATED", answer
    assert answer["payment"]["voided_minor"] == 10_000
    code, err = call(w, "POST", f"/v1/payments/{pid}/capture", {}, "cap-late")
    assert code == 409 and err["code"] == "unexpected_state"


def test_bad_requests_are_refused_with_reasons(env) -> None:
    _, w = env
    code, err = call(w, "POST", "/v1/payments", body())
    assert code == 400 and err["code"] == "idempotency_key_missing"
    code, err = call(w, "POST", "/v1/payments", body(amount_minor=10.5), "k-float")
    assert code == 400 and [f["field"] for f in err["fields"]] == ["amount_minor"]
    code, err = call(w, "POST", "/v1/payments", body(currency="ZZZ"), "k-currency")
    assert code == 400 and err["fields"][0]["field"] == "currency"
    code, err = call(w, "POST", "/v1/payments", b"{not json", "k-json")
    assert code == 400 and err["code"] == "invalid_json"
    code, err = call(w, "POST", "/v1/payments?wait=abc", body(), "k-wait")
    assert code == 400 and err["code"] == "invalid_wait"
    code, err = call(w, "GET", "/v1/payments/pay_nobody")
    assert code == 404 and err["code"] == "not_found"
    code, err = call(w, "POST", "/v1/payments/pay_nobody/capture", {}, "k-nobody")
    assert code == 404
    code, err = call(w, "POST", "/v1/payments", body(), "k-noauth", auth=False)
    assert code == 401


def test_card_data_is_refused_and_stored_nowhere(env) -> None:
    _, w = env
    cases = [
        body(card_number=PAN),
        {**body(), "card": {"number": PAN, "exp_month": 12, "exp_year": 2030, "cvc": "123"}},
        body(card_token=PAN),
        body(description=f"card {PAN[:4]} {PAN[4:8]} {PAN[8:12]} {PAN[12:]}"),
        body(order_id=PAN),
    ]
    for n, doc in enumerate(cases):
        code, raw, _ = w.call("POST", "/v1/payments", doc, {"Idempotency-Key": f"pan-{n}"})
        assert code == 400, (n, raw)
        assert PAN.encode() not in raw and b"4111 1111" not in raw
        err = json.loads(raw)
        assert err["code"] in ("card_data_refused", "invalid_request"), err
    code, raw, _ = w.call("POST", "/v1/payments", body(), {"Idempotency-Key": PAN})
    assert code == 400 and PAN.encode() not in raw
    code, raw, _ = w.call("POST", "/v1/payments/pay_x/refund", {"reason": f"card {PAN}"},
                          {"Idempotency-Key": "pan-reason"})  # fmt: skip
    assert code == 400 and PAN.encode() not in raw
    code, raw, _ = w.call("GET", f"/v1/payments/{PAN}")
    assert code == 404 and PAN.encode() not in raw

    # Nothing of it anywhere: no topic, no state file, no log line.
    t = Topics(w.settings.topic_prefix)
    names = [t.initiated, t.requests, t.dlq, t.status, t.commands, t.accepted]
    records = asyncio.run(read_all(w.settings.bootstrap, *names, isolation="read_uncommitted"))
    for r in records:
        blob = (r.key or b"") + (r.value or b"") + b"".join(v for _, v in r.headers or ())
        assert PAN.encode() not in blob
    for f in Path(w.settings.data_dir).rglob("*"):
        if f.is_file():
            assert PAN.encode() not in f.read_bytes(), f
    assert PAN not in w.tail(10_000_000)


def test_openapi_describes_every_route(env) -> None:
    _, w = env
    code, spec = call(w, "GET", "/openapi.json")
    assert code == 200 and spec["openapi"].startswith("3.1")
    routes = {"/v1/payments", "/v1/payments/{payment_id}/refund", "/payments/{payment_id}",
              "/idempotency/{merchant_id}/{key}", "/health", "/ready"}  # fmt: skip
    assert routes <= set(spec["paths"])
    assert "CreatePayment" in spec["components"]["schemas"]


def test_dlq_view_counts_letters_and_shows_no_payload(env) -> None:
    world, w = env
    payload = b"\x00MARKER-PAYLOAD not avro"

    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=w.settings.bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(world.t.initiated, payload, key=b"bad", partition=0)
        finally:
            await producer.stop()

    _, before = w.get("/dlq")
    asyncio.run(send())

    def grown() -> dict[str, Any] | None:
        code, view = w.get("/dlq")
        return view if code == 200 and view["total"] > before["total"] else None

    view = wait_for(grown, 60, what="the letter in /dlq")
    assert view["by_kind"].get("decode", 0) >= 1
    (letter,) = [x for x in view["recent"] if x["value_bytes"] == len(payload)]
    assert letter["topic"] == world.t.initiated and letter["error_class"]
    assert letter["failed_at_utc"].endswith("Z")
    _, raw, _ = w.call("GET", "/dlq")
    assert b"MARKER-PAYLOAD" not in raw
