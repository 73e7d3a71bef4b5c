"""The `payments` table: payment state by payment_id, in RocksDB with a Kafka changelog.

Keys are payment_id bytes; values are compact JSON of `paysaga.domain.payment.Payment`
(integers only for money). Partition p of the table belongs to task p of the engine, and its
changelog is `<app_id>-payments-changelog` (compacted, declared by `topics create`).
The same table holds the saga's durable timers (`tables.timers.KeyedTimers`) under keys
starting with byte 0x01 (`tables.timers`), so they are restored with the payments.
"""

from __future__ import annotations

PAYMENTS = "payments"
