"""A payment's audit trail, rebuilt from the topics (docs/replay.md#the-audit-trail).

Everything that happened to a payment is on a topic kept forever by default: the request
intake accepted, each answer and upstream request the saga applied or refused, each
command it sent, each retry it scheduled, each status it wrote. All of them are keyed by
the payment id with paysaga's partitioner, so the trail is the payment's partition of
each of these topics (and of the saga's repartition topic, where an input found
elsewhere was forwarded), merged in time order, with the offset and timestamp of each
record. `paysaga payment history ID` prints it; `GET /payments/{id}/events` serves it.
"""

from __future__ import annotations

from typing import Any

from aiokafka.structs import ConsumerRecord, TopicPartition
from pydantic import BaseModel

from paysaga.agents.rekey import H_SOURCE
from paysaga.schemas.codec import AvroCodec, DecodeError
from paysaga.streams.app.kafka_io import iter_partitions
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import Topics
from paysaga.streams.engine.partitioner import partition_for
from paysaga.streams.ops.api_models import utc_iso

#: Within one event time, what was read comes before what it caused.
_RANK = {"input": 0, "command": 1, "retry": 2, "status": 3}


class TrailEvent(BaseModel):
    """One record of a payment's history. `at` is its event time (`occurred_at`): an
    output carries its cause's, so ordering by it puts every input before what it caused
    (the record's own Kafka timestamp is `timestamp`: broker time on internal topics)."""

    at: int
    at_utc: str | None
    timestamp: int
    topic: str
    partition: int
    offset: int
    #: input (what the saga read), command, retry or status.
    role: str
    kind: str
    summary: str
    event_id: str | None = None


class Trail(BaseModel):
    payment_id: str
    events: list[TrailEvent]


def _sources(t: Topics, levels: int) -> dict[str, tuple[str, str]]:
    """Topic -> (schema, role) of everything that makes a payment's trail."""
    out = {
        t.accepted: ("PaymentInitiated", "input"),
        t.authorized: ("PaymentAuthorized", "input"),
        t.captured: ("PaymentCaptured", "input"),
        t.failed: ("PaymentFailed", "input"),
        t.reversed: ("PaymentReversed", "input"),
        t.settled: ("PaymentSettled", "input"),
        t.requests: ("PaymentRequest", "input"),
        t.saga_resume: ("SagaResume", "input"),
        t.inventory_events: ("InventoryEvent", "input"),
        t.shipping_events: ("ShippingEvent", "input"),
        t.commands: ("PaymentCommand", "command"),
        t.inventory_commands: ("InventoryCommand", "command"),
        t.shipping_commands: ("ShippingCommand", "command"),
        t.status: ("PaymentStatusChanged", "status"),
    }
    for level in range(1, levels + 1):
        out[t.retry(level)] = ("RetryScheduled", "retry")
    return out


def _summary(schema: str, v: dict[str, Any]) -> tuple[str, str]:
    """(kind, one line) of a decoded record: what an operator reads first."""
    money = f"{v['amount_minor']} {v.get('currency') or ''}".strip() if v.get(
        "amount_minor") is not None else ""  # fmt: skip
    if schema == "PaymentStatusChanged":
        line = f"{v.get('previous_status') or '-'} -> {v['status']}"
        if v.get("saga_state"):
            line += f", saga {v['saga_state']}" + (" (end)" if v.get("terminal") else "")
        if v.get("replay"):
            line += ", replay"
        if v.get("reason"):
            line += f": {v['reason']}"
        return v["status"], line
    if schema.endswith("Command"):
        kind = str(v.get("command_type") or v.get("action") or schema)
        return kind, f"{kind} attempt {v.get('attempt', 1)} {money}".strip()
    if schema == "RetryScheduled":
        return "RETRY", (f"{v['action']} retry {v['retry']} at level {v['level']}, due "
                         f"{utc_iso(v['due_at'])} ({v['error_class']}: {v['reason']})")  # fmt: skip
    if schema == "PaymentRequest":
        return v[
            "request_type"
        ], f"{v['request_type']} requested {money} key {v['idempotency_key']}"
    if schema == "PaymentInitiated":
        return "ACCEPTED", f"{v['saga']} saga for {money} ({v['capture_mode']})"
    if schema == "PaymentFailed":
        return "FAILED", f"{v['step']} failed: {v['reason_code']}" + (
            " (retryable)" if v.get("retryable") else "")  # fmt: skip
    if schema == "PaymentReversed":  # a void or a refund the gateway made
        return f"{v['kind']}ED", f"{v['kind']}ED {money}"
    outcome = v.get("outcome") or schema.removeprefix("Payment").upper()
    return str(outcome), f"{outcome} {money}".strip()


async def trail(settings: Settings, payment_id: str, timeout_s: float = 30.0) -> Trail:
    """Every record of `payment_id`'s history, oldest first (read_committed)."""
    from paysaga.schemas.registry import SchemaRegistry

    codec = AvroCodec(SchemaRegistry())
    t = Topics(settings.topic_prefix, settings.input_topic_prefix)
    sources = _sources(t, settings.retry_policy().levels)
    key = payment_id.encode()
    part = partition_for(key, settings.partitions)
    tps = [TopicPartition(name, part) for name in [*sources, t.saga_repartition]]
    events: list[TrailEvent] = []
    try:
        async for r in iter_partitions(settings.bootstrap, tps, timeout=timeout_s):
            if r.key == key:
                found = _event(codec, sources, t, r)
                if found is not None:
                    events.append(found)
    except TimeoutError:
        raise TimeoutError(f"reading the history of {payment_id} took over {timeout_s}s") from None
    events.sort(key=lambda e: (e.at, _RANK.get(e.role, 9), e.topic, e.offset))
    return Trail(payment_id=payment_id, events=events)


def _event(codec: AvroCodec, sources: dict[str, tuple[str, str]], t: Topics,
           r: ConsumerRecord) -> TrailEvent | None:  # fmt: skip
    topic = r.topic
    if topic == t.saga_repartition:  # forwarded: decoded as what it was first read from
        topic = dict(r.headers or ()).get(H_SOURCE, b"").decode()
    spec = sources.get(topic)
    if spec is None:
        return None
    schema, role = spec
    try:
        value = codec.decode(r.value or b"", schema)
    except DecodeError:
        return TrailEvent(at=r.timestamp, at_utc=utc_iso(r.timestamp), timestamp=r.timestamp,
                          topic=r.topic,
                          partition=r.partition, offset=r.offset, role=role, kind="UNDECODABLE",
                          summary=f"not a {schema} (refused: the DLQ has it)")  # fmt: skip
    kind, line = _summary(schema, value)
    at = int(value.get("occurred_at") or r.timestamp)
    return TrailEvent(at=at, at_utc=utc_iso(at), timestamp=r.timestamp, topic=r.topic,
                      partition=r.partition, offset=r.offset, role=role, kind=kind, summary=line,
                      event_id=value.get("event_id"))  # fmt: skip


def render(tr: Trail) -> str:
    lines = [f"{tr.payment_id}: {len(tr.events)} events"]
    for e in tr.events:
        lines.append(f"{e.at_utc}  {e.role:<7} {e.kind:<20} {e.summary}  "
                     f"[{e.topic}:{e.partition}@{e.offset}]")  # fmt: skip
    return "\n".join(lines)
