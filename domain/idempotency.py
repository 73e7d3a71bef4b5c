"""Idempotency with Stripe's semantics, as pure functions over a stored record.

Scope: (merchant_id, idempotency_key). The fingerprint is a hash of the canonical request:
every business field, not the delivery envelope (event_id, occurred_at, causation_id),
because an upstream retry re-sends the same request in a new event. The payment_id IS part
of the request: one key used for two payment ids is a conflict, never two payments.

- first sight: NEW (process it; remember fingerprint, payment and expiry);
- same key, same fingerprint: REPLAY (no new work; the stored outcome is re-emitted);
- same key, other fingerprint: CONFLICT (no state change).

Keys live at least `ttl_ms` after their first sight, by event time, and are then purged.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

#: Fields of a request that identify its delivery, not its content.
ENVELOPE_FIELDS = frozenset({"event_id", "occurred_at", "causation_id"})


class Decision(StrEnum):
    NEW = "NEW"
    REPLAY = "REPLAY"
    CONFLICT = "CONFLICT"


@dataclass(frozen=True)
class KeyRecord:
    """What the idempotency table keeps per scoped key."""

    fingerprint: str
    payment_id: str
    first_event_id: str
    expires_at: int

    def to_json(self) -> dict[str, Any]:
        return {"f": self.fingerprint, "p": self.payment_id, "e": self.first_event_id,
                "x": self.expires_at}  # fmt: skip

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> KeyRecord:
        return cls(d["f"], d["p"], d["e"], d["x"])


def fingerprint(request: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the request's business fields."""
    body = {k: v for k, v in request.items() if k not in ENVELOPE_FIELDS}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def scope_key(merchant_id: str, idempotency_key: str) -> str:
    """The table key: the merchant id's length, the merchant id, then the key. The length
    prefix keeps it unambiguous whatever characters either part contains."""
    return f"{len(merchant_id)}:{merchant_id}:{idempotency_key}"


def decide(
    stored: KeyRecord | None,
    fp: str,
    payment_id: str,
    event_id: str,
    event_time: int,
    ttl_ms: int,
) -> tuple[Decision, KeyRecord | None]:
    """The decision for a request, and the record to store (None: leave the table as is).

    A stored record past its expiry counts as absent (purging may lag behind event time).
    """
    if stored is not None and stored.expires_at > event_time:
        return (Decision.REPLAY if stored.fingerprint == fp else Decision.CONFLICT), None
    return Decision.NEW, KeyRecord(fp, payment_id, event_id, event_time + ttl_ms)
