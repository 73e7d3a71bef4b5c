"""Avro as a Faust codec, for agents and topics that want Faust to (de)serialize values.

paysaga's own agents read raw bytes and decode themselves, so a bad record reaches the DLQ
with its reason instead of being logged and skipped inside Faust's deserializer; this
adapter is for user code and tools that prefer ``value_serializer="avro-<Name>"``.
It is the only schemas module that imports Faust: the registry and codec stay pure.
"""

from __future__ import annotations

from typing import Any

from faust.serializers import codecs

from paysaga.schemas.codec import AvroCodec

__all__ = ["FaustAvroCodec", "register_faust_codecs"]


class FaustAvroCodec(codecs.Codec):
    """Single-object Avro for one record name; reads either framing.

    ``_loads`` raises `DecodeError` on bad bytes (Faust reports it as a value decode error).
    The constructor arguments are kept in ``kwargs`` so Faust's ``clone``/``|`` chaining
    can rebuild the codec.
    """

    def __init__(self, avro: AvroCodec, name: str, **kwargs: Any) -> None:
        self.avro = avro
        self.record_name = name
        super().__init__(avro=avro, name=name, **kwargs)

    def _dumps(self, obj: Any) -> bytes:
        return self.avro.encode(self.record_name, obj)

    def _loads(self, s: bytes) -> Any:
        return self.avro.decode(s, self.record_name)


def register_faust_codecs(avro: AvroCodec) -> list[str]:
    """Register ``avro-<Name>`` for every shipped record; returns the codec names."""
    names = []
    for full in avro.registry.names():
        short = full.rsplit(".", 1)[-1]
        codecs.register(f"avro-{short}", FaustAvroCodec(avro, short))
        names.append(f"avro-{short}")
    return names
