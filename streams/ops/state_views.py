"""Keyed views rendered from a task's committed state: one render per table, used by the
web view that shows it and by the payments API that reads it (streams/ops/routing.py
`Router`), so a view and the API always say the same thing about a key."""

from __future__ import annotations

import json
from urllib.parse import quote

from pydantic import BaseModel

from paysaga.domain.card import redact
from paysaga.domain.idempotency import KeyRecord, scope_key
from paysaga.streams.ops.api_models import ApiError, utc_iso
from paysaga.streams.ops.routing import Render
from paysaga.tables.store import PartitionStore


class IdempotencyView(BaseModel):
    """`GET /idempotency/{merchant_id}/{key}`: what intake remembers of a key (Stripe's
    idempotency semantics, docs/contract.md#idempotency)."""

    merchant_id: str
    idempotency_key: str
    payment_id: str
    fingerprint: str
    first_event_id: str
    expires_at: int
    expires_at_utc: str | None


#: The longest payment id there is (schemas/models.py `Id`).
MAX_ID = 64


def shown_id(payment_id: str) -> str:
    """A payment id as an answer may echo it: bounded and redacted (a path can carry
    anything, a card number too)."""
    return redact(payment_id[:MAX_ID])


def not_found(what: str, payment_id: str | None = None) -> tuple[int, bytes]:
    shown = None if payment_id is None else shown_id(payment_id)
    error = ApiError(error=f"{what} not found", code="not_found", payment_id=shown)
    return 404, error.model_dump_json().encode()


def payment_key(payment_id: str) -> bytes:
    return payment_id.encode()


def payment_path(payment_id: str) -> str:
    return f"/payments/{quote(payment_id, safe='')}"


def render_payment(payment_id: str) -> Render:
    """The stored payment as it is (the `payments` table's JSON: domain/payment.py)."""

    def render(store: PartitionStore) -> tuple[int, bytes]:
        value = store.get(payment_key(payment_id))
        return (200, value) if value is not None else not_found("payment", payment_id=payment_id)

    return render


def idempotency_key(merchant_id: str, key: str) -> bytes:
    return scope_key(merchant_id, key).encode()


def idempotency_path(merchant_id: str, key: str) -> str:
    return f"/idempotency/{quote(merchant_id, safe='')}/{quote(key, safe='')}"


def render_idempotency(merchant_id: str, key: str) -> Render:
    def render(store: PartitionStore) -> tuple[int, bytes]:
        raw = store.get(idempotency_key(merchant_id, key))
        if raw is None:
            return not_found("idempotency key")
        rec = KeyRecord.from_json(json.loads(raw))
        view = IdempotencyView(
            merchant_id=merchant_id,
            idempotency_key=key,
            payment_id=rec.payment_id,
            fingerprint=rec.fingerprint,
            first_event_id=rec.first_event_id,
            expires_at=rec.expires_at,
            expires_at_utc=utc_iso(rec.expires_at),
        )
        return 200, view.model_dump_json().encode()

    return render
