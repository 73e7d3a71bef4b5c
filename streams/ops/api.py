"""The HTTP payments API: upstream's requests as HTTP, with Stripe's conventions
(docs/api.md).

A write is an event on the topic an upstream producer would write (`payment.initiated`,
`payment.requests`), sent through the worker's one idempotent producer and acknowledged
by the broker before the answer; the saga does the rest exactly as for any producer. The
API decides nothing the saga would not: before writing it reads committed state where
the key lives (streams/ops/routing.py `Router`) and asks the domain's own rules:

- the same `Idempotency-Key` with the same body is a replay: nothing is written, and the
  answer names the same payment (as it stands now);
- the same key with another body is 409 `idempotency_conflict`;
- a request the saga would refuse (capture of a declined payment, refund beyond what is
  refundable) is 409 `unexpected_state`, with the saga's reason.

Two writes racing with one key both reach intake or the saga, which decide once (REPLAY or
CONFLICT, docs/contract.md#idempotency); a `?wait` answer reads the decision back, so the
loser of a race with another body still gets its 409, and a request the saga refused on a
state that changed meanwhile gets its 409 as soon as the state says so. `?wait=MS` (at most
`api_max_wait_ms`) answers 200 with the payment once the saga has answered the write,
read from committed state; 202 otherwise. No card data is taken: a body naming a card
number, CVC or expiry, or holding a card number anywhere, is refused with 400 before
anything is parsed further, and is never logged, stored or echoed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from pydantic import BaseModel, ValidationError

from paysaga.domain.card import card_data_paths, contains_pan, redact
from paysaga.domain.idempotency import KeyRecord, fingerprint, scope_key
from paysaga.domain.payment import Payment, PaymentStatus
from paysaga.domain.saga import cancel_refusal, capture_refusal, refund_refusal
from paysaga.schemas import events as ev
from paysaga.schemas.codec import AvroCodec, EncodeError
from paysaga.schemas.models import PaymentInitiated
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import Topics
from paysaga.streams.engine.partitioner import partition_for
from paysaga.streams.ops.api_models import (
    ApiError,
    CancelBody,
    CaptureBody,
    CreatePayment,
    FieldError,
    PaymentResource,
    RefundBody,
    WriteAnswer,
)
from paysaga.streams.ops.routing import RETRY_AFTER_S, Answer, Router
from paysaga.streams.ops.state_views import (
    MAX_ID,
    idempotency_key,
    idempotency_path,
    payment_key,
    payment_path,
    render_idempotency,
    render_payment,
    shown_id,
)
from paysaga.tables.idempotency import IDEMPOTENCY
from paysaga.tables.payments import PAYMENTS

Operation = Literal["capture", "refund", "cancel"]
H_IDEMPOTENCY_KEY = "Idempotency-Key"
#: How often `?wait` reads the payment again while the saga has not answered: first
#: soon, then less often (a remote owner is asked over HTTP each time).
POLL_S, MAX_POLL_S = 0.02, 0.2
_BODIES: dict[str, type[BaseModel]] = {
    "capture": CaptureBody,
    "refund": RefundBody,
    "cancel": CancelBody,
}
_REQUEST_TYPES = {
    "capture": ev.RequestType.CAPTURE,
    "refund": ev.RequestType.REFUND,
    "cancel": ev.RequestType.CANCEL,
}


@dataclass
class Reply:
    """An API answer: status, a model for the body, headers."""

    status: int
    body: BaseModel
    headers: dict[str, str] = field(default_factory=dict)


class Refused(Exception):
    """A request answered with an error before anything is written."""

    def __init__(
        self,
        status: int,
        code: str,
        error: str,
        fields: list[FieldError] | None = None,
        payment_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(error)
        self.reply = Reply(
            status,
            ApiError(error=error, code=code, fields=fields or [], payment_id=payment_id),
            headers or {},
        )


def payment_id_for(merchant_id: str, key: str, fp: str) -> str:
    """The payment a create makes: derived from its idempotency scope and its request's
    fingerprint. A retried request names the same payment, so intake sees a replay, never
    a second payment; a key reused with another body after its lifetime names another
    payment, a new one, as Stripe lets an expired key be used again."""
    seed = f"{scope_key(merchant_id, key)}\n{fp}".encode()
    return "pay_" + hashlib.sha256(seed).hexdigest()[:24]


def field_errors(exc: ValidationError) -> list[FieldError]:
    """Pydantic's errors as (field, message), with no input value in them."""
    out = []
    for err in exc.errors(include_input=False, include_url=False, include_context=False):
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        out.append(FieldError(field=redact(loc), message=err["msg"].removeprefix("Value error, ")))
    return out


def parse_body(raw: bytes, model: type[BaseModel]) -> tuple[dict[str, Any], BaseModel]:
    """The JSON object in `raw`, validated by `model`; card data refused first."""
    try:
        doc = json.loads(raw) if raw.strip() else {}
        if not isinstance(doc, dict):
            raise Refused(400, "invalid_body", "the body must be a JSON object")
        paths = card_data_paths(doc)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise Refused(400, "invalid_json", "the body is not JSON, or is nested too deep") from None
    if paths:
        raise Refused(
            400,
            "card_data_refused",
            "card numbers, security codes and expiry dates are not accepted: send "
            "a card token (card_token) from your vault; nothing was stored",
            [FieldError(field=p, message="card data") for p in paths],
        )
    try:
        return doc, model.model_validate(doc)
    except ValidationError as exc:
        raise Refused(
            400, "invalid_request", "the body is not a valid request", field_errors(exc)
        ) from None


def key_of(headers: Mapping[str, str]) -> str:
    key = headers.get(H_IDEMPOTENCY_KEY)
    if key is None:
        raise Refused(
            400,
            "idempotency_key_missing",
            f"an {H_IDEMPOTENCY_KEY} header is required on every write",
        )
    if not 1 <= len(key) <= 255 or not key.isprintable():
        raise Refused(
            400,
            "idempotency_key_invalid",
            f"{H_IDEMPOTENCY_KEY} must be 1 to 255 printable characters",
        )
    if contains_pan(key):
        raise Refused(400, "card_data_refused", f"{H_IDEMPOTENCY_KEY} holds a card number")
    return key


def wait_ms(query: Mapping[str, str], limit: int) -> int:
    raw = query.get("wait")
    if raw is None:
        return 0
    if not (raw.isascii() and raw.isdecimal()) or int(raw) > limit:
        raise Refused(
            400,
            "invalid_wait",
            f"wait must be milliseconds from 0 to {limit}",
            [FieldError(field="wait", message=f"0 to {limit}")],
        )
    return int(raw)


def created_answered(p: Payment) -> bool:
    """The saga has answered a new payment: past its first decision, or ended."""
    return p.status is not PaymentStatus.INITIATED or bool(p.saga and p.saga.finished)


def request_fingerprint(p: Payment, key: str) -> str | None:
    """The fingerprint stored under `key` by any request on `p` (capture and cancel keys,
    refund keys): one key names one request, whatever its type, as at Stripe."""
    if key in p.requests:
        return p.requests[key]
    refund = p.refunds.get(key)
    return None if refund is None else refund.fingerprint


def refusal(op: Operation, p: Payment, amount: int | None) -> str | None:
    """Why the saga would refuse `op` on `p` now (domain/saga.py), or None."""
    if op == "capture":
        return capture_refusal(p, amount)
    if op == "refund":
        return refund_refusal(p, amount)
    return cancel_refusal(p)


def request_answered(op: Operation, key: str, amount: int | None) -> Callable[[Payment], bool]:
    """The saga has decided the request: taken it up (its key recorded) and answered it;
    or the key went to another request (a conflict); or the request would be refused on
    the payment as it now is, so the saga refuses it too."""

    def answered(p: Payment) -> bool:
        ended = bool(p.saga and p.saga.finished)
        if op == "refund" and key in p.refunds:
            return p.refunds[key].state != "PENDING"
        if op != "refund" and key in p.requests:
            return ended or (op == "capture" and p.status is not PaymentStatus.AUTHORIZED)
        return request_fingerprint(p, key) is not None or refusal(op, p, amount) is not None

    return answered


class ApiWriter:
    """The worker's one producer for API writes: idempotent (no duplicate on a producer
    retry), acks=all, started on the first write and stopped with the worker. A write the
    broker did not take is 503 (the client retries with its key; nothing is doubled)."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    async def _started(self) -> AIOKafkaProducer:
        async with self._lock:
            if self._closed:
                raise Refused(503, "unavailable", "the worker is stopping",
                              headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip
            if self._producer is None:
                producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all",
                                            enable_idempotence=True, linger_ms=1)  # fmt: skip
                try:
                    await producer.start()
                except BaseException:
                    await producer.stop()
                    raise
                self._producer = producer
            return self._producer

    async def send(self, topic: str, key: bytes, value: bytes, partition: int) -> None:
        """Send and wait for the broker's acknowledgement."""
        try:
            producer = await self._started()
            await (await producer.send(topic, value, key=key, partition=partition))
        except (KafkaError, OSError, TimeoutError) as exc:
            raise Refused(503, "unavailable", f"Kafka did not take the write: "
                          f"{type(exc).__name__}", headers={"Retry-After": str(RETRY_AFTER_S)}
                          ) from None  # fmt: skip

    async def close(self) -> None:
        async with self._lock:
            self._closed = True
            if self._producer is not None:
                await self._producer.stop()
                self._producer = None


def _json_or_none(answer: Answer) -> Any:
    try:
        return answer.json()
    except ValueError:
        return None


class PaymentsApi:
    """`/v1/payments`: create, capture, refund, cancel, get (module docstring)."""

    def __init__(self, settings: Settings, router: Router, writer: ApiWriter,
                 codec: AvroCodec) -> None:  # fmt: skip
        self.settings, self.router, self.writer, self.codec = settings, router, writer, codec
        self.topics = Topics(settings.topic_prefix, settings.input_topic_prefix)

    # ---- reads --------------------------------------------------------------------------
    @staticmethod
    def _found(answer: Answer) -> bytes | None:
        """The body of a view's answer; None for its own "not found"; else refused. A 404
        that is not the view's own (an older worker without the route, a proxy) is not
        taken for an unknown key."""
        body = _json_or_none(answer) if answer.status != 200 else None
        if answer.status == 200:
            return answer.body
        if answer.status == 404 and isinstance(body, dict) and body.get("code") == "not_found":
            return None
        if answer.status == 503:
            why = body.get("error") if isinstance(body, dict) else None
            headers = {k: v for k, v in answer.headers.items()
                       if k in ("Retry-After", "X-Paysaga-Partition")}  # fmt: skip
            headers.setdefault("Retry-After", str(RETRY_AFTER_S))
            raise Refused(503, "unavailable", str(why or "the key's task is moving"),
                          headers=headers)  # fmt: skip
        raise Refused(502, "owner_error", f"the worker owning the key answered {answer.status}")

    async def payment(self, payment_id: str) -> Payment | None:
        if not 0 < len(payment_id) <= MAX_ID:
            return None  # no such id can exist
        render, path = render_payment(payment_id), payment_path(payment_id)
        answer = await self.router.read(payment_key(payment_id), PAYMENTS, render, path)
        raw = self._found(answer)
        return None if raw is None else Payment.from_json(raw)

    async def key_record(self, merchant_id: str, key: str) -> KeyRecord | None:
        answer = await self.router.read(idempotency_key(merchant_id, key), IDEMPOTENCY,
                                        render_idempotency(merchant_id, key),
                                        idempotency_path(merchant_id, key))  # fmt: skip
        raw = self._found(answer)
        if raw is None:
            return None
        v = json.loads(raw)
        return KeyRecord(v["fingerprint"], v["payment_id"], v["first_event_id"], v["expires_at"])

    async def get(self, payment_id: str) -> Reply:
        try:
            p = await self.payment(payment_id)
        except Refused as exc:
            return exc.reply
        if p is None:
            return self._unknown(payment_id).reply
        return Reply(200, PaymentResource.of(p))

    @staticmethod
    def _unknown(payment_id: str) -> Refused:
        return Refused(404, "not_found", "payment not found", payment_id=shown_id(payment_id))

    async def _until(self, payment_id: str, answered: Callable[[Payment], bool],
                     ms: int) -> tuple[Payment | None, bool]:  # fmt: skip
        """Read the payment until `answered`, or `ms` pass: (payment, answered). Each read
        is bounded by the time left, so the wait ends on time even when an owner is slow."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ms / 1000
        pause, p = POLL_S, None
        while True:
            left = deadline - loop.time()
            # Moving or slow: keep the last reading and ask again until the deadline.
            with contextlib.suppress(Refused, TimeoutError):
                p = await asyncio.wait_for(self.payment(payment_id), max(left, 0.05))
            if p is not None and answered(p):
                return p, True
            left = deadline - loop.time()
            if left <= 0:
                return p, False
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, MAX_POLL_S)

    @staticmethod
    def _answer(op: Literal["create", "capture", "refund", "cancel"], pid: str, key: str,
                replayed: bool, p: Payment | None, answered: bool,
                waited: bool) -> Reply:  # fmt: skip
        body = WriteAnswer(id=pid, operation=op, idempotency_key=key, replayed=replayed,
                           answered=answered,
                           payment=None if p is None else PaymentResource.of(p))  # fmt: skip
        return Reply(200 if waited and answered else 202, body, {"Location": f"/v1/payments/{pid}"})

    @staticmethod
    def _conflict(payment_id: str) -> Refused:
        return Refused(409, "idempotency_conflict",
                       "this Idempotency-Key was used with another request body",
                       payment_id=payment_id)  # fmt: skip

    def _encode(self, schema: str, record: dict[str, Any]) -> bytes:
        try:
            return self.codec.encode(schema, record)
        except EncodeError:  # a value the model allows and Avro cannot hold (not echoed)
            raise Refused(400, "invalid_request",
                          "a value is out of the range its field can hold") from None  # fmt: skip

    # ---- writes -------------------------------------------------------------------------
    async def create(self, headers: Mapping[str, str], raw: bytes,
                     query: Mapping[str, str]) -> Reply:  # fmt: skip
        try:
            key = key_of(headers)
            ms = wait_ms(query, self.settings.api_max_wait_ms)
            _, body = parse_body(raw, CreatePayment)
            now = int(time.time() * 1000)
            fields = body.model_dump(mode="json")
            envelope = {"event_id": str(uuid.uuid4()), "occurred_at": now,
                        "correlation_id": fields["order_id"], "causation_id": None,
                        "idempotency_key": key}  # fmt: skip
            # The fingerprint leaves the envelope out (domain/idempotency.py) but not the
            # payment id, which is derived from it: computed over a placeholder first.
            draft = {**envelope, **fields, "payment_id": "-"}
            pid = payment_id_for(fields["merchant_id"], key, fingerprint(
                {k: v for k, v in draft.items() if k != "payment_id"}))  # fmt: skip
            try:
                event = PaymentInitiated.model_validate({**draft, "payment_id": pid})
            except ValidationError as exc:
                raise Refused(400, "invalid_request", "the body is not a valid request",
                              field_errors(exc)) from None  # fmt: skip
            record = event.to_avro()
            fp = fingerprint(record)
            merchant = event.merchant_id
            known = await self.key_record(merchant, key)
            replayed = known is not None and known.expires_at > now
            if known is not None and replayed and known.fingerprint != fp:
                raise self._conflict(known.payment_id)
            if not replayed:
                scope = scope_key(merchant, key).encode()
                value = self._encode("PaymentInitiated", record)
                await self.writer.send(self.topics.initiated, scope, value,
                                       partition_for(scope, self.settings.partitions))  # fmt: skip
            if not ms:
                return self._answer("create", pid, key, replayed, None, False, False)
            p, answered = await self._until(pid, created_answered, ms)
            if not replayed:  # a racing write with the same key may have won at intake
                decided = await self.key_record(merchant, key)
                if decided is not None and decided.fingerprint != fp:
                    raise self._conflict(decided.payment_id)
            return self._answer("create", pid, key, replayed, p, answered, True)
        except Refused as exc:
            return exc.reply

    async def request(self, op: Operation, payment_id: str, headers: Mapping[str, str],
                      raw: bytes, query: Mapping[str, str]) -> Reply:  # fmt: skip
        try:
            key = key_of(headers)
            ms = wait_ms(query, self.settings.api_max_wait_ms)
            _, body = parse_body(raw, _BODIES[op])
            p = await self.payment(payment_id)
            if p is None:
                raise self._unknown(payment_id)
            amount: int | None = getattr(body, "amount_minor", None)
            now = int(time.time() * 1000)
            event = ev.PaymentRequest(
                event_id=str(uuid.uuid4()), occurred_at=now, payment_id=payment_id,
                correlation_id=p.order_id, request_type=_REQUEST_TYPES[op],
                idempotency_key=key, merchant_id=p.merchant_id,
                currency=None if amount is None else p.currency, amount_minor=amount,
                reason=getattr(body, "reason", None),
            )  # fmt: skip
            fp = fingerprint(event.model_dump(mode="json"))
            seen = request_fingerprint(p, key)
            if seen is not None and seen != fp:
                raise self._conflict(payment_id)
            replayed = seen is not None
            if not replayed:
                if (refused := refusal(op, p, amount)) is not None:
                    raise Refused(409, "unexpected_state", refused, payment_id=payment_id)
                pkey = payment_key(payment_id)
                value = self._encode("PaymentRequest", event.model_dump(mode="json"))
                partition = partition_for(pkey, self.settings.partitions)
                await self.writer.send(self.topics.requests, pkey, value, partition)
            if not ms:
                return self._answer(op, payment_id, key, replayed, p, False, False)
            after, answered = await self._until(payment_id, request_answered(op, key, amount), ms)
            now_p = after or p
            stored = request_fingerprint(now_p, key)
            if stored is not None and stored != fp:  # another body under this key won
                raise self._conflict(payment_id)
            if stored is None and answered:  # refused on the state it met (module docstring)
                why = refusal(op, now_p, amount) or "refused by the saga"
                raise Refused(409, "unexpected_state", why, payment_id=payment_id)
            return self._answer(op, payment_id, key, replayed, now_p, answered, True)
        except Refused as exc:
            return exc.reply
