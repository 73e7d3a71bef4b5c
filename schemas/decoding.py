"""Decoding and validating input bytes once per worker, however many agents read them.

One record's bytes are read by several agents and hops: the saga and reconciliation both
read `payment.captured` (fan-out), and a record re-keyed to a repartition topic comes back
with the same bytes. Decoding and validation are a pure function of the bytes and the edge
models are frozen, so recent valid results are kept by value (`ParsedMemo`, first in,
first out). A refusal is never kept: a registry that was unavailable may answer next time.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from pydantic import BaseModel

from paysaga.schemas.codec import AvroCodec

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

#: Results kept: a few fetched batches' worth (a PaymentInitiated is about 5 KiB parsed,
#: a lifecycle event about 2 KiB; measured with tracemalloc).
MEMO_SIZE = 8_192


class ParsedMemo(Generic[T]):
    """A bounded map from input bytes to what they parse to, oldest out first."""

    def __init__(self, size: int = MEMO_SIZE) -> None:
        self.size = size
        self._held: dict[bytes, T] = {}

    def get(self, value: bytes) -> T | None:
        return self._held.get(value)

    def take(self, value: bytes) -> T | None:
        """The result, removed: for the last reader of the bytes."""
        return self._held.pop(value, None)

    def put(self, value: bytes, parsed: T) -> None:
        if not self.size:
            return
        held = self._held
        held[value] = parsed
        if len(held) > self.size:
            del held[next(iter(held))]  # dicts keep insertion order: the oldest

    def __len__(self) -> int:
        return len(self._held)


class EdgeDecoder:
    """`codec.decode` then `model.model_validate`, remembered by bytes across agents.

    Raises what they raise (`DecodeError`, `ValidationError`); only successes are kept."""

    def __init__(self, codec: AvroCodec, size: int = MEMO_SIZE) -> None:
        self.codec = codec
        self.memo: ParsedMemo[BaseModel] = ParsedMemo(size)

    def decode(self, value: bytes, schema: str, model: type[M]) -> M:
        hit = self.memo.get(value)
        if type(hit) is model:
            return hit
        parsed = model.model_validate(self.codec.decode(value, schema))
        self.memo.put(value, parsed)
        return parsed
