"""Avro bytes <-> dicts in both wire framings, resolving the writer's schema to ours.

Single-object encoding (0xC3 0x01 + 8-byte CRC-64-AVRO fingerprint) is what paysaga writes;
the Confluent framing (0x00 + 4-byte big-endian schema id) is read and can be written for
producers that use a registry. Every failure is a `DecodeError` with a short reason code
and a message that never echoes payload bytes: callers send the record to the DLQ.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

from fastavro import schemaless_reader, schemaless_writer

from paysaga.schemas.registry import Schema, SchemaError, SchemaRegistry

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = 0


class DecodeError(ValueError):
    """Bytes that cannot be read as the expected record; `reason` is a short code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class AvroCodec:
    """Encode and decode paysaga records; reads resolve writer -> current reader schema."""

    def __init__(self, registry: SchemaRegistry) -> None:
        self.registry = registry

    def encode(self, name: str, record: dict[str, Any]) -> bytes:
        """Single-object encoding with the current schema of `name`."""
        return self.encode_with(self.registry.reader(name), record)

    def encode_with(self, schema: Schema, record: dict[str, Any]) -> bytes:
        """Single-object encoding with a given schema version (e.g. an older writer)."""
        out = BytesIO()
        out.write(SINGLE_OBJECT_MAGIC)
        out.write(schema.fingerprint)
        schemaless_writer(out, schema.parsed, record)
        return out.getvalue()

    def encode_confluent(self, name: str, record: dict[str, Any], schema_id: int) -> bytes:
        """Confluent framing: 0x00, the registry id, then the Avro body."""
        out = BytesIO()
        out.write(b"\x00")
        out.write(schema_id.to_bytes(4, "big"))
        schemaless_writer(out, self.registry.reader(name).parsed, record)
        return out.getvalue()

    def writer_of(self, data: bytes) -> tuple[Schema, int]:
        """The writer schema named by the framing, and where the Avro body starts."""
        if not data:
            raise DecodeError("empty", "empty payload")
        if data[:2] == SINGLE_OBJECT_MAGIC:
            if len(data) < 10:
                raise DecodeError("truncated", "single-object header shorter than 10 bytes")
            schema = self.registry.by_fingerprint(data[2:10])
            if schema is None:
                raise DecodeError(
                    "unknown-fingerprint", f"unknown schema fingerprint {data[2:10].hex()}"
                )
            return schema, 10
        if data[0] == CONFLUENT_MAGIC:
            if len(data) < 5:
                raise DecodeError("truncated", "Confluent header shorter than 5 bytes")
            schema_id = int.from_bytes(data[1:5], "big")
            try:
                schema = self.registry.by_id(schema_id)
            except SchemaError as exc:
                raise DecodeError("unknown-schema-id", str(exc)) from None
            if schema is None:
                raise DecodeError("unknown-schema-id", f"unknown Confluent schema id {schema_id}")
            return schema, 5
        raise DecodeError("unknown-magic", f"unknown framing (first byte 0x{data[0]:02x})")

    def decode(self, data: bytes, reader_name: str) -> dict[str, Any]:
        """Read `data` as record `reader_name`, whichever compatible version wrote it."""
        writer, start = self.writer_of(data)
        reader = self.registry.reader(reader_name)
        if writer.name != reader.name:
            raise DecodeError("wrong-record", f"payload is a {writer.name}, expected {reader.name}")
        body = BytesIO(data)
        body.seek(start)
        try:
            if writer is reader:
                record = schemaless_reader(body, writer.parsed, None)
            else:
                record = schemaless_reader(body, writer.parsed, reader.parsed)
        except EOFError:
            raise DecodeError("truncated", "Avro body ends early") from None
        except Exception as exc:  # fastavro raises many types on garbage
            raise DecodeError("invalid-avro", f"invalid Avro body ({type(exc).__name__})") from None
        if body.tell() != len(data):
            raise DecodeError("trailing-bytes", f"{len(data) - body.tell()} bytes after the record")
        return record  # type: ignore[return-value]
