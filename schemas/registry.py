"""The Avro schemas paysaga ships, found by name, by fingerprint or by Confluent schema id.

Single-object encoding names its writer schema by the CRC-64-AVRO fingerprint of the
schema's Parsing Canonical Form; the Confluent framing names it by a registry id. Both
resolve here: fingerprints against every shipped version (current and `history/`), so older
producers keep working; ids through a configured id map or a Confluent-compatible registry.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from functools import cache
from importlib import resources
from typing import Any

from fastavro import parse_schema
from fastavro.schema import to_parsing_canonical_form

NAMESPACE = "io.paysaga"
_EMPTY = 0xC15D213AA4D7A795


@cache
def _crc_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_EMPTY & -(fp & 1))
        table.append(fp)
    return tuple(table)


def fingerprint(schema: dict[str, Any]) -> bytes:
    """The 8-byte little-endian CRC-64-AVRO fingerprint used by single-object encoding."""
    table = _crc_table()
    fp = _EMPTY
    for byte in to_parsing_canonical_form(schema).encode():
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp.to_bytes(8, "little")


def strip_logical_types(schema: Any) -> Any:
    """A copy without logicalType annotations.

    paysaga reads uuids as str and timestamps as epoch-millis int; fastavro's conversions
    to UUID/datetime cost about a third of the decode time and would be converted back.
    The canonical form (and so the fingerprint) ignores logicalType anyway.
    """
    if isinstance(schema, dict):
        return {k: strip_logical_types(v) for k, v in schema.items() if k != "logicalType"}
    if isinstance(schema, list):
        return [strip_logical_types(s) for s in schema]
    return schema


def full_name(name: str) -> str:
    return name if "." in name else f"{NAMESPACE}.{name}"


class SchemaError(LookupError):
    """A schema could not be found or fetched."""


class Schema:
    """One schema version: its JSON, its parsed (logical-type-free) form, its fingerprint."""

    __slots__ = ("fingerprint", "name", "parsed", "source")

    def __init__(self, source: dict[str, Any]) -> None:
        self.source = source
        self.name = (
            full_name(source["name"])
            if "namespace" not in source
            else (f"{source['namespace']}.{source['name']}")
        )
        self.parsed = parse_schema(strip_logical_types(source), _write_hint=False)
        self.fingerprint = fingerprint(source)


class SchemaRegistry:
    """Shipped schemas plus Confluent id resolution (id map first, then the registry URL)."""

    def __init__(
        self,
        id_map: dict[int, str] | None = None,
        registry_url: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        self._current: dict[str, Schema] = {}
        self._by_fp: dict[bytes, Schema] = {}
        self._by_id: dict[int, Schema] = {}
        self._registry_url = registry_url.rstrip("/") if registry_url else None
        self._timeout = timeout
        self._lock = threading.Lock()
        root = resources.files("paysaga.schemas")
        for entry in root.iterdir():
            if entry.name.endswith(".avsc"):
                schema = self.add(json.loads(entry.read_text()))
                self._current[schema.name] = schema
        history = root.joinpath("history")
        if history.is_dir():
            for folder in history.iterdir():
                for version in folder.iterdir():
                    if version.name.endswith(".avsc"):
                        self.add(json.loads(version.read_text()))
        for schema_id, name in (id_map or {}).items():
            self._by_id[int(schema_id)] = self.reader(name)

    def add(self, source: dict[str, Any]) -> Schema:
        """Register one more writer schema version (e.g. one a producer fleet still uses)."""
        schema = Schema(source)
        self._by_fp.setdefault(schema.fingerprint, schema)
        return self._by_fp[schema.fingerprint]

    def names(self) -> list[str]:
        return sorted(self._current)

    def reader(self, name: str) -> Schema:
        """The current (reader) version of record `name` (short or full name)."""
        try:
            return self._current[full_name(name)]
        except KeyError:
            raise SchemaError(f"no schema named {name!r}") from None

    def by_fingerprint(self, fp: bytes) -> Schema | None:
        return self._by_fp.get(bytes(fp))

    def by_id(self, schema_id: int) -> Schema | None:
        """The writer schema for a Confluent id: id map, cache, then the registry URL."""
        schema = self._by_id.get(schema_id)
        if schema is not None or self._registry_url is None:
            return schema
        with self._lock:
            if schema_id not in self._by_id:
                self._by_id[schema_id] = self.add(self._fetch(schema_id))
        return self._by_id[schema_id]

    def _fetch(self, schema_id: int) -> dict[str, Any]:
        url = f"{self._registry_url}/schemas/ids/{schema_id}"
        try:
            with urllib.request.urlopen(url, timeout=self._timeout) as resp:
                body = json.loads(resp.read())
            return json.loads(body["schema"])
        except urllib.error.HTTPError as exc:
            raise SchemaError(
                f"schema registry has no schema id {schema_id} ({exc.code})"
            ) from None
        except (OSError, ValueError, KeyError) as exc:
            raise SchemaError(f"schema registry {url} unreachable or invalid: {exc}") from None
