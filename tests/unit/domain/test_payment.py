"""The payment record's own helpers: derived ids and the table encoding."""

from __future__ import annotations

import json
import uuid

from hypothesis import given
from hypothesis import strategies as st

from paysaga.domain.payment import PAYSAGA_NS, Payment, derived_id
from paysaga.domain.saga import Orchestrator


@given(st.lists(st.text(), min_size=1, max_size=4))
def test_derived_id_is_uuid5_of_the_joined_parts(parts: list[str]) -> None:
    assert derived_id(*parts) == str(uuid.uuid5(PAYSAGA_NS, ":".join(parts)))


def _payment() -> Payment:
    p = Payment(
        payment_id="pay_1", merchant_id="m_1", customer_id="c_1", order_id="ord_1",
        idempotency_key="k_1", amount_minor=1999, currency="EUR", capture_mode="AUTOMATIC",
        card_token="tok_abc", items=[{"sku": "s", "quantity": 2}], created_at=1, updated_at=1,
        shipping_country="FR",
    )  # fmt: skip
    p.record("ev-1", "PaymentInitiated", 1)
    Orchestrator().start(p, "ORDER", 10)
    return p


def test_table_json_round_trips_and_reads_as_plain_json() -> None:
    p = _payment()
    raw = p.to_json()
    assert Payment.from_json(raw) == p
    # The same bytes as the compact JSON of `to_table` that the table held before (ASCII
    # data), so views and tools reading the table see the same document.
    assert raw == json.dumps(p.to_table(), separators=(",", ":")).encode()
