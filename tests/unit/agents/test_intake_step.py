"""IntakeStep.parse keeps recent valid requests decoded, and only those."""

from __future__ import annotations

from paysaga.agents.intake import IntakeStep, Rejected
from paysaga.schemas.models import PaymentInitiated
from tests.saga_support import CODEC
from tests.samples import initiated


def _bytes(n: int) -> list[bytes]:
    return [CODEC.encode("PaymentInitiated", e) for e in initiated(n, seed=5)]


def test_the_same_bytes_are_decoded_once_until_their_last_reader_takes_them() -> None:
    step = IntakeStep(CODEC)
    raw = _bytes(1)[0]
    first = step.parse(raw)
    assert isinstance(first, PaymentInitiated)
    assert step.parse(raw) is first  # the repartition hop: kept
    assert step.parse(raw, last=True) is first  # the saga: taken
    again = step.parse(raw)
    assert again == first and again is not first  # decoded anew


def test_refusals_are_not_kept_and_the_memo_is_bounded() -> None:
    step = IntakeStep(CODEC, memo=2)
    assert isinstance(step.parse(b"\x13\x37 junk"), Rejected)
    assert len(step._parsed) == 0
    records = _bytes(3)
    parsed = [step.parse(r) for r in records]
    assert len(step._parsed) == 2 and step._parsed.get(records[0]) is None  # oldest out
    assert step._parsed.get(records[2]) is parsed[2]
    assert step.parse(records[0]) is not parsed[0]
