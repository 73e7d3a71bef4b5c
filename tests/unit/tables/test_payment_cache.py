"""PaymentCache: parsed payments between inputs, never trusted over the table's bytes."""

from __future__ import annotations

from pathlib import Path

from paysaga.domain.payment import Payment
from paysaga.tables.payments import PaymentCache
from paysaga.tables.store import StoreManager
from paysaga.tables.transaction import TableTransaction


def _payment(pid: str = "pay_1") -> Payment:
    return Payment(payment_id=pid, merchant_id="m", customer_id="c", order_id="o",
                   idempotency_key="k", amount_minor=100, currency="EUR",
                   capture_mode="AUTOMATIC", card_token="tok", created_at=1,
                   updated_at=1)  # fmt: skip


def _table(tmp_path: Path) -> TableTransaction:
    return TableTransaction(StoreManager(tmp_path).open("payments", 0))


def test_a_stored_payment_is_handed_back_until_the_table_says_otherwise(tmp_path: Path) -> None:
    table, cache = _table(tmp_path), PaymentCache()
    p = _payment()
    cache.store(table, b"pay_1", p)
    assert cache.load(table, b"pay_1") is p  # the next input of the payment: no parsing
    # Loaded means handed over: it may be changed in place, so it is not handed out twice.
    again = cache.load(table, b"pay_1")
    assert again == p and again is not p


def test_bytes_that_differ_from_the_stored_ones_are_read_from_the_table(tmp_path: Path) -> None:
    table, cache = _table(tmp_path), PaymentCache()
    p = _payment()
    cache.store(table, b"pay_1", p)
    other = _payment()
    other.amount_minor = 250  # e.g. the committed value after this batch was aborted
    table.set(b"pay_1", other.to_json())
    loaded = cache.load(table, b"pay_1")
    assert loaded is not None and loaded.amount_minor == 250
    assert cache.load(table, b"missing") is None


def test_the_cache_is_bounded(tmp_path: Path) -> None:
    table, cache = _table(tmp_path), PaymentCache(size=2)
    held = [_payment(f"pay_{i}") for i in range(3)]
    for p in held:
        cache.store(table, p.payment_id.encode(), p)
    assert cache.load(table, b"pay_0") is not held[0]  # the oldest went first
    assert cache.load(table, b"pay_2") is held[2]
