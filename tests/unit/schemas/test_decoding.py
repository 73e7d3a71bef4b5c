"""Decoded events remembered by bytes across agents (schemas/decoding.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from paysaga.schemas import events as ev
from paysaga.schemas.codec import AvroCodec, DecodeError
from paysaga.schemas.decoding import EdgeDecoder, ParsedMemo
from paysaga.schemas.registry import SchemaRegistry

CODEC = AvroCodec(SchemaRegistry())


def captured(n: int, amount: int = 1000) -> bytes:
    return CODEC.encode("PaymentCaptured", {
        "event_id": f"00000000-0000-4000-8000-{n:012d}", "occurred_at": 1, "payment_id": f"p{n}",
        "correlation_id": "o", "causation_id": None, "amount_minor": amount, "currency": "EUR",
        "merchant_id": "m", "gateway_reference": "g", "capture_id": "c", "command_id": None,
    })  # fmt: skip


def test_the_same_bytes_are_decoded_once_for_every_reader() -> None:
    edge = EdgeDecoder(CODEC)
    raw = captured(1)
    first = edge.decode(raw, "PaymentCaptured", ev.PaymentCaptured)
    assert edge.decode(raw, "PaymentCaptured", ev.PaymentCaptured) is first
    assert edge.decode(captured(2), "PaymentCaptured", ev.PaymentCaptured) is not first


def test_another_model_of_the_same_bytes_is_validated_anew() -> None:
    edge = EdgeDecoder(CODEC)
    raw = captured(1)
    edge.decode(raw, "PaymentCaptured", ev.PaymentCaptured)
    with pytest.raises(DecodeError):  # the bytes are no PaymentFailed: refused, not reused
        edge.decode(raw, "PaymentFailed", ev.PaymentFailed)


def test_refusals_are_not_kept() -> None:
    edge = EdgeDecoder(CODEC)
    bad = captured(1, amount=-5)
    for _ in range(2):
        with pytest.raises(ValidationError):
            edge.decode(bad, "PaymentCaptured", ev.PaymentCaptured)
    assert len(edge.memo) == 0


def test_the_memo_is_bounded_oldest_out_first() -> None:
    memo: ParsedMemo[int] = ParsedMemo(2)
    for i in range(3):
        memo.put(bytes([i]), i)
    assert len(memo) == 2 and memo.get(b"\x00") is None and memo.get(b"\x02") == 2
    assert memo.take(b"\x02") == 2 and memo.get(b"\x02") is None
    off: ParsedMemo[int] = ParsedMemo(0)
    off.put(b"x", 1)
    assert len(off) == 0
