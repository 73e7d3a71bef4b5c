"""The `idempotency` table: request fingerprints by (merchant_id, idempotency_key).

Keys are `paysaga.domain.idempotency.scope_key` bytes; values compact JSON of `KeyRecord`.
Partition p holds the scopes that paysaga's partitioner maps to p (intake re-keys
payment.initiated by scope first), so one key's requests always meet in one task, whatever
payment_id they carry. Expiry by event time through a timer index in the same table.
"""

from __future__ import annotations

IDEMPOTENCY = "idempotency"
