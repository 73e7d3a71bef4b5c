"""The upstream producer simulator's data: bad input when asked for, and only then."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from paysaga.domain.money import currency_exponent
from paysaga.schemas.models import PaymentInitiated
from paysaga.streams.dev.upstream import UpstreamConfig, generate


def test_invalid_requests_are_bad_input_and_change_nothing_else() -> None:
    plain = list(generate(UpstreamConfig(count=2_000, seed=3), now_ms=lambda: 1))
    mixed = list(generate(UpstreamConfig(count=2_000, seed=3, invalid_rate=0.05),
                          now_ms=lambda: 1))  # fmt: skip
    bad = [e for e in mixed if e["currency"] == "ZZZ"]
    assert 50 <= len(bad) <= 150  # about 5 %
    assert all(e["currency"] != "ZZZ" for e in plain)
    for e in mixed:
        if e["currency"] != "ZZZ":
            currency_exponent(e["currency"])  # a real ISO 4217 code
    bad_ids = {e["payment_id"] for e in bad}
    # never repeated as a client retry or a conflicting request
    assert not [e for e in mixed if e["payment_id"] in bad_ids and e["currency"] != "ZZZ"]
    with pytest.raises(ValidationError, match="currency"):  # what intake will say
        PaymentInitiated.model_validate(bad[0])
