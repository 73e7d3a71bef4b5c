"""Avro bytes <-> dicts in both wire framings, resolving the writer's schema to ours.

Single-object encoding (0xC3 0x01 + 8-byte CRC-64-AVRO fingerprint) is what paysaga writes;
the Confluent framing (0x00 + 4-byte big-endian schema id) is read and can be written for
producers that use a registry. Every read failure is a `DecodeError` with a short reason
code and a message that never echoes payload bytes: callers send the record to the DLQ.

Decoded records are plain dicts with logical types left as their Avro primitives:
``event_id`` is a ``str`` and timestamps are ``int`` epoch millis (see
`registry.strip_logical_types`). Encoding expects the same.

Pure module: no Faust or Kafka imports.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from io import BytesIO
from typing import Any, cast

from fastavro import schemaless_reader, schemaless_writer

from paysaga.domain.card import redact
from paysaga.schemas.registry import (
    RegistryUnavailable,
    Schema,
    SchemaError,
    SchemaRegistry,
    UnknownSchemaId,
)

__all__ = [
    "CONFLUENT_MAGIC",
    "SINGLE_OBJECT_MAGIC",
    "AvroCodec",
    "DecodeError",
    "EncodeError",
]

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = 0
_SINGLE_HEADER = 10
_CONFLUENT_HEADER = 5


class DecodeError(ValueError):
    """Bytes that cannot be read as the expected record.

    ``reason`` is a short machine-friendly code: ``empty``, ``truncated``, ``unknown-magic``,
    ``unknown-fingerprint``, ``unknown-schema-id``, ``registry-unavailable`` (transient:
    retry rather than dead-letter), ``wrong-record``, ``invalid-avro``, ``trailing-bytes``.
    The message names header facts only (framing, fingerprint, schema id, sizes), never
    body bytes, and is PAN-redacted.
    """

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        self.message = redact(message)
        super().__init__(self.message)


class EncodeError(ValueError):
    """A record that does not fit its schema (a bug in the producing code)."""


#: A reader-only field filled after a fast writer-schema read: (name, default factory).
_Fill = tuple[tuple[str, Callable[[], Any]], ...]


@dataclass(frozen=True, slots=True)
class _Plan:
    """How to read one (writer, reader) pair; built once and cached.

    ``reader`` None means "read with the writer schema alone" (identical canonical forms, or
    a purely additive evolution whose missing fields are filled from ``fill``): fastavro's
    general resolution costs about twice a plain read.
    """

    writer: dict[str, Any]
    reader: dict[str, Any] | None
    fill: _Fill


class AvroCodec:
    """Encode and decode paysaga records; reads resolve writer -> current reader schema."""

    def __init__(self, registry: SchemaRegistry) -> None:
        self.registry = registry
        self._plans: dict[tuple[bytes, str], _Plan] = {}
        self._writers: dict[str, tuple[dict[str, Any], bytes]] = {}

    # -- encoding ---------------------------------------------------------------------------

    def encode(self, name: str, record: Mapping[str, Any]) -> bytes:
        """Single-object encoding with the current schema of ``name``."""
        cached = self._writers.get(name)
        if cached is None:
            schema = self.registry.reader(name)
            cached = self._writers[name] = (schema.parsed, SINGLE_OBJECT_MAGIC + schema.fingerprint)
        return _write(cached[1], cached[0], record)

    def encode_with(self, schema: Schema, record: Mapping[str, Any]) -> bytes:
        """Single-object encoding with a given schema version (e.g. an older writer)."""
        return _write(SINGLE_OBJECT_MAGIC + schema.fingerprint, schema.parsed, record)

    def encode_confluent(self, name: str, record: Mapping[str, Any], schema_id: int) -> bytes:
        """Confluent framing: 0x00, the 4-byte big-endian registry id, then the Avro body."""
        if not 0 <= schema_id < 2**32:
            raise EncodeError(f"schema id {schema_id} does not fit 4 unsigned bytes")
        header = b"\x00" + schema_id.to_bytes(4, "big")
        return _write(header, self.registry.reader(name).parsed, record)

    # -- decoding ---------------------------------------------------------------------------

    def writer_of(self, data: bytes) -> tuple[Schema, int]:
        """The writer schema named by the framing, and where the Avro body starts."""
        if not data:
            raise DecodeError("empty", "empty payload")
        if data[:2] == SINGLE_OBJECT_MAGIC:
            if len(data) < _SINGLE_HEADER:
                raise DecodeError("truncated", "single-object header shorter than 10 bytes")
            fp = bytes(data[2:_SINGLE_HEADER])
            schema = self.registry.by_fingerprint(fp)
            if schema is None:
                raise DecodeError("unknown-fingerprint", f"unknown schema fingerprint {fp.hex()}")
            return schema, _SINGLE_HEADER
        if data[0] == CONFLUENT_MAGIC:
            if len(data) < _CONFLUENT_HEADER:
                raise DecodeError("truncated", "Confluent header shorter than 5 bytes")
            schema_id = int.from_bytes(data[1:_CONFLUENT_HEADER], "big")
            try:
                found = self.registry.by_id(schema_id)
            except RegistryUnavailable as exc:
                raise DecodeError("registry-unavailable", str(exc)) from None
            except (UnknownSchemaId, SchemaError) as exc:
                raise DecodeError("unknown-schema-id", str(exc)) from None
            if found is None:
                raise DecodeError("unknown-schema-id", f"unknown Confluent schema id {schema_id}")
            return found, _CONFLUENT_HEADER
        raise DecodeError("unknown-magic", f"unknown framing (first byte 0x{data[0]:02x})")

    def decode(self, data: bytes, reader_name: str) -> dict[str, Any]:
        """Read ``data`` as record ``reader_name``, whichever compatible version wrote it.

        Raises :class:`DecodeError` for anything the bytes can do wrong; an unknown
        ``reader_name`` is a programming error and raises `SchemaError`.
        """
        writer, start = self.writer_of(data)
        plan = self._plans.get((writer.fingerprint, reader_name))
        if plan is None:
            plan = self._plan(writer, reader_name)
        body = BytesIO(data)
        body.seek(start)
        try:
            # A record schema reads as a dict (fastavro types any Avro value).
            record = cast("dict[str, Any]", schemaless_reader(body, plan.writer, plan.reader))
        except EOFError:
            raise DecodeError("truncated", f"Avro body of {writer.name} ends early") from None
        except Exception as exc:  # fastavro raises many types on garbage
            raise DecodeError(
                "invalid-avro",
                f"invalid Avro body for {writer.name} ({type(exc).__name__} "
                f"near body offset {body.tell() - start})",
            ) from None
        end = body.tell()
        if end != len(data):
            raise DecodeError(
                "trailing-bytes", f"{len(data) - end} bytes after the {writer.name} record"
            )
        for name, factory in plan.fill:
            record[name] = factory()
        return record

    def _plan(self, writer: Schema, reader_name: str) -> _Plan:
        reader = self.registry.reader(reader_name)
        if writer.name != reader.name:
            raise DecodeError("wrong-record", f"payload is a {writer.name}, expected {reader.name}")
        if writer.canonical == reader.canonical:
            plan = _Plan(writer.parsed, None, ())
        else:
            fill = _additive_fill(writer.source, reader.source)
            plan = (
                _Plan(writer.parsed, None, fill)
                if fill is not None
                else _Plan(writer.parsed, reader.parsed, ())
            )
        self._plans[(writer.fingerprint, reader_name)] = plan
        return plan


def _write(header: bytes, parsed: dict[str, Any], record: Mapping[str, Any]) -> bytes:
    out = BytesIO()
    out.write(header)
    try:
        schemaless_writer(out, parsed, record)
    except Exception as exc:  # fastavro raises TypeError/ValueError/KeyError/... on bad data
        detail = redact(str(exc))[:200]
        raise EncodeError(
            f"record does not fit {parsed.get('name')}: {type(exc).__name__}: {detail}"
        ) from None
    return out.getvalue()


# -- additive evolution fast path ----------------------------------------------------------

_IGNORED_KEYS = frozenset({"doc", "default", "aliases", "order", "logicalType"})
_SCALARS = frozenset({"null", "boolean", "int", "long", "string"})


def _structure(t: Any) -> Any:
    """A type's shape for equality: no docs, defaults, aliases or logical types."""
    if isinstance(t, dict):
        return {k: _structure(v) for k, v in t.items() if k not in _IGNORED_KEYS}
    if isinstance(t, list):
        return [_structure(x) for x in t]
    return t


def _default_factory(field: dict[str, Any]) -> Callable[[], Any] | None:
    """A factory for the decoded default of a field, or None if it is not trivially known."""
    if "default" not in field:
        return None
    default = field["default"]
    first = field["type"][0] if isinstance(field["type"], list) else field["type"]
    kind = first.get("type") if isinstance(first, dict) else first
    if kind in _SCALARS and (default is None or isinstance(default, bool | int | str)):
        return lambda: default
    if kind == "enum" and default in first.get("symbols", ()):
        return lambda: default
    if kind == "map" and default == {}:
        return dict
    if kind == "array" and default == []:
        return list
    return None


def _additive_fill(writer: dict[str, Any], reader: dict[str, Any]) -> _Fill | None:
    """Reader-only fields to fill, if reader = writer + fields with simple defaults.

    That is the usual evolution (add an optional field), and then a plain writer-schema
    read plus filling the defaults gives exactly what fastavro's resolution gives, at half
    the cost. Anything else (removed, renamed, retyped or promoted fields, named types
    referenced across fields, non-trivial defaults) returns None: use full resolution.
    """
    reader_fields = {f["name"]: f for f in reader["fields"]}
    for wf in writer["fields"]:
        rf = reader_fields.get(wf["name"])
        if rf is None or _structure(rf["type"]) != _structure(wf["type"]):
            return None
    writer_names = {f["name"] for f in writer["fields"]}
    fill: list[tuple[str, Callable[[], Any]]] = []
    for rf in reader["fields"]:
        if rf["name"] in writer_names:
            continue
        factory = _default_factory(rf)
        if factory is None:
            return None
        fill.append((rf["name"], factory))
    return tuple(fill)
