"""The OpenAPI 3.1 description of every endpoint, served at `/openapi.json`.

Generated from the same pydantic models the code validates bodies with and renders answers
from (streams/ops/api_models.py, streams/ops/state_views.py, domain/payment.py), so the
description cannot drift from the code; the tests fuzz a live worker against it
(schemathesis) and check every answer against these schemas.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import models_json_schema

from paysaga.domain.payment import Payment
from paysaga.streams.ops.api_models import (
    ApiError,
    CancelBody,
    CaptureBody,
    CreatePayment,
    PaymentResource,
    RefundBody,
    WriteAnswer,
)
from paysaga.streams.ops.history import Trail
from paysaga.streams.ops.state_views import IdempotencyView
from paysaga.streams.ops.topic_views import DlqView, ReconWindowDetail, ReconWindows

VERSION = "1"


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    """`/ready`: 200 when the worker owns its tasks, restored, and commits; 503 otherwise."""

    model_config = ConfigDict(extra="allow")

    ready: bool
    assigned: bool
    recovering: list[Any] | int | bool | None = None
    failing: Any = None
    tasks: list[int]
    stats: dict[str, Any]
    breakers: dict[str, Any]


class Unavailable(BaseModel):
    """503: the key's task is moving between workers or being restored; ask again after
    `Retry-After` seconds (docs/operations.md#any-worker-answers)."""

    model_config = ConfigDict(extra="allow")

    error: str
    partition: int | None = None
    retry_after_s: int | None = None


_MODELS: tuple[type[BaseModel], ...] = (
    ApiError,
    CancelBody,
    CaptureBody,
    CreatePayment,
    Health,
    IdempotencyView,
    Payment,
    PaymentResource,
    Ready,
    RefundBody,
    Unavailable,
    WriteAnswer,
)


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string", "minLength": 1, "maxLength": 64},
    }


_AUTH = {"401": _json(ApiError, "a token is configured and this request did not carry it")}
_MOVING = {"503": _json(Unavailable, "the key's task is moving or restoring: ask again")}
_TOPICS = {"503": _json(Unavailable, "the topics cannot be read yet: ask again")}
_KEY_HEADER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": True,
    "description": "the client's key for this write (Stripe's semantics)",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
}


def _wait(max_ms: int) -> dict[str, Any]:
    return {
        "name": "wait",
        "in": "query",
        "required": False,
        "description": "answer once the saga has, waiting at most this many ms",
        "schema": {"type": "integer", "minimum": 0, "maximum": max_ms},
    }


def _write(op: str, body: type[BaseModel], summary: str, max_ms: int) -> dict[str, Any]:
    params = [_KEY_HEADER, _wait(max_ms)]
    if op != "create":
        params.insert(0, _path_param("payment_id", "the payment's id"))
    return {
        "operationId": f"{op}Payment",
        "summary": summary,
        "parameters": params,
        "requestBody": {"required": False, "content": {"application/json": {"schema": _ref(body)}}},
        "responses": {
            "200": _json(WriteAnswer, "the saga has answered (with ?wait)"),
            "202": _json(WriteAnswer, "recorded; the saga has not answered yet"),
            "400": _json(ApiError, "invalid body, header or wait; card data refused"),
            "404": _json(ApiError, "no such payment"),
            "409": _json(ApiError, "idempotency conflict, or the payment's state refuses it"),
            **_AUTH,
            **_MOVING,
        },
    }


def openapi(max_wait_ms: int) -> dict[str, Any]:
    """The document (`?wait` bounded by `max_wait_ms`): paths, and every model's JSON
    schema under components."""
    _, defs = models_json_schema(
        [
            (
                m,
                "validation"
                if m in (CreatePayment, CaptureBody, RefundBody, CancelBody)
                else "serialization",
            )
            for m in _MODELS
        ],
        ref_template="#/components/schemas/{model}",
    )
    pid = _path_param("payment_id", "the payment's id")
    get_payment = {
        "operationId": "getPayment",
        "summary": "a payment as the API shows it",
        "parameters": [pid],
        "responses": {
            "200": _json(PaymentResource, "the payment"),
            "404": _json(ApiError, "no such payment"),
            **_AUTH,
            **_MOVING,
        },
    }
    create = _write("create", CreatePayment, "create a payment (a PaymentInitiated)", max_wait_ms)
    create["operationId"] = "createPayment"
    create["responses"].pop("404")
    create["requestBody"]["required"] = True
    paths: dict[str, Any] = {
        "/health": {
            "get": {
                "operationId": "health",
                "summary": "alive",
                "responses": {"200": _json(Health, "alive")},
            }
        },
        "/ready": {
            "get": {
                "operationId": "ready",
                "summary": "owns its tasks, restored, Kafka accepting its transactions",
                "responses": {
                    "200": _json(Ready, "ready"),
                    "503": _json(Ready, "not ready"),
                    **_AUTH,
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus text exposition",
                "responses": {
                    "200": {
                        "description": "metrics",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_AUTH,
                },
            }
        },
        "/payments/{payment_id}": {
            "get": {
                "operationId": "paymentState",
                "summary": "the payments table's record",
                "parameters": [pid],
                "responses": {
                    "200": _json(Payment, "the stored payment"),
                    "404": _json(ApiError, "no such payment"),
                    **_AUTH,
                    **_MOVING,
                },
            }
        },
        "/payments/{payment_id}/events": {
            "get": {
                "operationId": "paymentEvents",
                "summary": "the payment's audit trail, from the topics (docs/replay.md)",
                "parameters": [pid],
                "responses": {
                    "200": _json(Trail, "every input, command, retry and status"),
                    "404": _json(ApiError, "no record of this payment"),
                    **_AUTH,
                    **_TOPICS,
                },
            }
        },
        "/idempotency/{merchant_id}/{key}": {
            "get": {
                "operationId": "idempotencyKey",
                "summary": "what intake remembers of a key",
                "parameters": [
                    _path_param("merchant_id", "the merchant"),
                    {
                        **_path_param("key", "the Idempotency-Key"),
                        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                    },
                ],
                "responses": {
                    "200": _json(IdempotencyView, "the key's record"),
                    "404": _json(ApiError, "never seen, or expired and purged"),
                    **_AUTH,
                    **_MOVING,
                },
            }
        },
        "/dlq": {
            "get": {
                "operationId": "deadLetters",
                "summary": "dead letters by kind and class, and the latest (no payload bytes)",
                "responses": {"200": _json(DlqView, "the DLQ"), **_AUTH, **_TOPICS},
            }
        },
        "/reconciliation/{merchant_id}/{currency}": {
            "get": {
                "operationId": "reconWindows",
                "summary": "a merchant's latest reconciliation windows in a currency",
                "parameters": [
                    _path_param("merchant_id", "the merchant"),
                    _path_param("currency", "ISO 4217 code"),
                ],
                "responses": {
                    "200": _json(ReconWindows, "the windows, newest first"),
                    **_AUTH,
                    **_TOPICS,
                },
            }
        },
        "/reconciliation/{merchant_id}/{currency}/{window_start}": {
            "get": {
                "operationId": "reconWindow",
                "summary": "one reconciliation window, its revisions and discrepancies",
                "parameters": [
                    _path_param("merchant_id", "the merchant"),
                    _path_param("currency", "ISO 4217 code"),
                    _path_param("window_start", "epoch millis or ISO 8601"),
                ],
                "responses": {
                    "200": _json(ReconWindowDetail, "the window"),
                    "400": _json(ApiError, "window_start unreadable"),
                    "404": _json(ApiError, "no report for this window"),
                    **_AUTH,
                    **_TOPICS,
                },
            }
        },
        "/v1/payments": {"post": create},
        "/v1/payments/{payment_id}": {"get": get_payment},
        "/v1/payments/{payment_id}/capture": {
            "post": {
                **_write(
                    "capture", CaptureBody, "capture an authorization, all or part", max_wait_ms
                ),
            }
        },
        "/v1/payments/{payment_id}/refund": {
            "post": {
                **_write("refund", RefundBody, "refund captured money, all or part", max_wait_ms),
            }
        },
        "/v1/payments/{payment_id}/cancel": {
            "post": {
                **_write(
                    "cancel", CancelBody, "void an authorization awaiting capture", max_wait_ms
                ),
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "paysaga",
            "version": VERSION,
            "description": "Operator views and the payments API (docs/api.md).",
        },
        "paths": paths,
        "components": {
            "schemas": defs["$defs"],
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"token": []}],
    }
