"""The `payments` table: payment state by payment_id, in RocksDB with a Kafka changelog.

Keys are payment_id bytes; values are compact JSON of `paysaga.domain.payment.Payment`
(integers only for money). Partition p of the table belongs to task p of the engine, and its
changelog is `<app_id>-payments-changelog` (compacted, declared by `topics create`).
The same table holds the saga's durable timers (`tables.timers.KeyedTimers`) under keys
starting with byte 0x01 (`tables.timers`), so they are restored with the payments.
"""

from __future__ import annotations

from paysaga.domain.payment import Payment
from paysaga.tables.transaction import TableTransaction

PAYMENTS = "payments"

#: Parsed payments kept between their inputs (`PaymentCache`), 6 KiB and up each (history grows).
CACHE_SIZE = 4_096


class PaymentCache:
    """The payments a worker wrote last, kept parsed, so the next input of a payment in
    flight skips parsing and validating its JSON (a tenth of the saga's CPU otherwise).

    The table stays the truth: a payment is taken from the cache only when the bytes the
    table holds now are the very bytes stored with it, so a batch that aborted, a record
    processed again, a payment changed by another worker meanwhile, all read the table's
    value. Payments are mutable and the saga changes them in place, so `load` hands the
    cached object over (it leaves the cache) and `store` takes it back with its new bytes;
    a payment must not change after it was stored.
    """

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self._size = size
        self._held: dict[bytes, tuple[bytes, Payment]] = {}

    def load(self, table: TableTransaction, key: bytes) -> Payment | None:
        raw = table.get(key)
        if raw is None:
            return None
        held = self._held.pop(key, None)
        if held is not None and held[0] == raw:
            return held[1]
        return Payment.from_json(raw)

    def store(self, table: TableTransaction, key: bytes, payment: Payment) -> None:
        raw = payment.to_json()
        table.set(key, raw)
        if self._size:
            held = self._held
            held.pop(key, None)
            held[key] = (raw, payment)
            if len(held) > self._size:
                del held[next(iter(held))]  # dicts keep insertion order: the oldest
