"""Every record the payment topology writes, each built in one place.

The agents emit these through `ProcessorContext.emit(topic, schema, fields)`, so the
topology's one codec encodes each exactly once. The status record of a payment is the
domain's `status_event`; the ones here are the records that have no payment behind them
(an idempotency conflict) or that speak to another service (commands).
"""

from __future__ import annotations

import json
from typing import Any

from paysaga.domain.breaker import Transition
from paysaga.domain.card import redact
from paysaga.domain.payment import Outstanding, Payment, derived_id
from paysaga.domain.saga import Command, ScheduledRetry
from paysaga.schemas.models import PaymentInitiated

STATUS = "PaymentStatusChanged"
RETRY = "RetryScheduled"
RESUME = "SagaResume"
BREAKER_TRANSITION = "BreakerTransition"
#: Avro record of each service's commands.
COMMAND_SCHEMAS = {"payment": "PaymentCommand", "inventory": "InventoryCommand",
                   "shipping": "ShippingCommand"}  # fmt: skip

_encode_json = json.JSONEncoder(separators=(",", ":")).encode


def compact_json(value: Any) -> bytes:
    """Table values: compact JSON (integers only for money)."""
    return _encode_json(value).encode()


def conflict_status(event: PaymentInitiated, holder: str) -> dict[str, Any]:
    """The IDEMPOTENCY_CONFLICT outcome for a request whose key another request holds."""
    return {
        "event_id": derived_id(event.event_id, "status", event.payment_id, "conflict"),
        "occurred_at": event.occurred_at,
        "payment_id": event.payment_id,
        "correlation_id": event.correlation_id,
        "causation_id": event.event_id,
        "merchant_id": event.merchant_id,
        "idempotency_key": event.idempotency_key,
        "status": "IDEMPOTENCY_CONFLICT",
        "previous_status": None,
        "amount_minor": event.amount_minor,
        "currency": event.currency,
        "replay": False,
        "reason": f"idempotency key already used for a different request (payment {holder})",
    }


def command_record(p: Payment, c: Command, cause: str, occurred_at: int) -> dict[str, Any]:
    """The command `c` of payment `p` as its service's Avro record (COMMAND_SCHEMAS)."""
    envelope = {
        "event_id": c.command_id, "occurred_at": occurred_at, "payment_id": p.payment_id,
        "correlation_id": p.order_id, "causation_id": cause, "command_id": c.command_id,
        "idempotency_key": c.idempotency_key,
    }  # fmt: skip
    if c.service == "payment":
        return {
            **envelope, "command_type": c.action, "amount_minor": c.amount_minor,
            "currency": p.currency, "merchant_id": p.merchant_id,
            "card_token": p.card_token, "attempt": c.attempt,
        }  # fmt: skip
    if c.service == "inventory":
        items = [{"sku": i.sku, "quantity": i.quantity} for i in p.items]
        return {**envelope, "command_type": c.action, "order_id": p.order_id, "items": items}
    return {**envelope, "command_type": c.action, "order_id": p.order_id,
            "address_country": p.shipping_country}  # fmt: skip


def retry_record(p: Payment, r: ScheduledRetry, cause: str, occurred_at: int) -> dict[str, Any]:
    """The RetryScheduled record of a retry the saga scheduled (payment.retry.<level>)."""
    c = r.command
    return {
        "event_id": derived_id(cause, "retry", c.command_id), "occurred_at": occurred_at,
        "payment_id": p.payment_id, "correlation_id": p.order_id, "causation_id": cause,
        "command_id": c.command_id, "idempotency_key": c.idempotency_key,
        "service": c.service, "action": c.action, "step": c.step, "attempt": c.attempt,
        "retry": r.retry, "level": r.level,
        "due_at": r.due_at, "delay_ms": r.delay_ms, "variant": r.variant,
        "error_class": r.error_class.value, "reason": r.reason[:1000],
    }  # fmt: skip


def resume_record(p: Payment, o: Outstanding, cause: str, occurred_at: int, error_class: str,
                  reason: str) -> dict[str, Any]:  # fmt: skip
    """The SagaResume a review letter carries for a command given up (docs/dlq.md): its
    id names the doubt (key, attempts, inquiries), so every copy of it is the same input."""
    key = o.idempotency_key
    return {
        "event_id": derived_id(p.payment_id, "resume", key, str(o.attempt), str(o.inquiries)),
        "occurred_at": occurred_at, "payment_id": p.payment_id, "correlation_id": p.order_id,
        "causation_id": cause, "idempotency_key": key, "service": o.service,
        "action": o.action, "step": o.step, "attempt": o.attempt, "inquiries": o.inquiries,
        "error_class": error_class, "reason": redact(reason)[:1000],
    }  # fmt: skip


def breaker_record(t: Transition, partition: int, seq: int, held: int,
                   config: str) -> dict[str, Any]:  # fmt: skip
    """The BreakerTransition record of one state change of a task's breaker."""
    return {
        "event_id": derived_id("breaker", "gateway", str(partition), str(seq)),
        "occurred_at": t.at_ms, "breaker": "gateway", "task_partition": partition,
        "sequence": seq, "from_state": t.from_state.value, "to_state": t.to_state.value,
        "failure_rate_pct": t.failure_rate_pct, "calls": t.calls, "held": held,
        "reason": t.reason[:1000], "config": config,
    }  # fmt: skip
