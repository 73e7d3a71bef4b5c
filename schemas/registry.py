"""The Avro schemas paysaga ships, found by name, by fingerprint or by Confluent schema id.

Single-object encoding names its writer schema by the CRC-64-AVRO fingerprint of the
schema's Parsing Canonical Form; the Confluent framing names it by a registry id. Both
resolve here: fingerprints against every shipped version (current and `history/`), so older
producers keep working; ids through a configured id map or a Confluent-compatible registry.

Pure module: no Faust or Kafka imports (the registry URL is plain HTTP via urllib).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from importlib import resources
from typing import Any, cast

from fastavro import parse_schema
from fastavro.schema import fingerprint as _fastavro_fingerprint
from fastavro.schema import to_parsing_canonical_form
from fastavro.types import Schema as AvroSchema

__all__ = [
    "NAMESPACE",
    "RegistryUnavailable",
    "Schema",
    "SchemaError",
    "SchemaRegistry",
    "UnknownSchemaId",
    "fingerprint",
    "full_name",
    "strip_logical_types",
]

NAMESPACE = "io.paysaga"
#: How long a registry "no such id" answer is remembered, so a stream of records with a
#: bogus id does not turn into one HTTP request each.
MISSING_ID_TTL_S = 30.0


def fingerprint(schema: AvroSchema) -> bytes:
    """The 8-byte little-endian CRC-64-AVRO fingerprint used by single-object encoding.

    fastavro's hex string is already in little-endian byte order (the Avro spec's test
    vector: ``"null"`` -> 0x63DD24E7CC258F8A -> bytes 8a 8f 25 cc e7 24 dd 63). Note that
    the `avro` package's canonical form keeps ``{"type": "string"}`` for logical types,
    which the spec (and Java) reduce to ``"string"``: do not use its fingerprints.
    """
    return bytes.fromhex(_fastavro_fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))


def strip_logical_types(schema: Any) -> Any:
    """A copy without logicalType annotations.

    paysaga reads uuids as str and timestamps as epoch-millis int; fastavro applies its
    conversions (to UUID / datetime) according to the WRITER schema, so stripping them from
    the schemas we read and write with is the only per-codec way to turn them off (the
    conversion table is process-global). They cost about a third of the decode time and
    would be converted back anyway. The canonical form (and so the fingerprint) ignores
    logicalType, and the binary encoding does not depend on it.
    """
    if isinstance(schema, dict):
        return {k: strip_logical_types(v) for k, v in schema.items() if k != "logicalType"}
    if isinstance(schema, list):
        return [strip_logical_types(s) for s in schema]
    return schema


def full_name(name: str) -> str:
    """``PaymentInitiated`` -> ``io.paysaga.PaymentInitiated``; full names pass through."""
    return name if "." in name else f"{NAMESPACE}.{name}"


class SchemaError(LookupError):
    """A schema could not be found, parsed or fetched."""


class UnknownSchemaId(SchemaError):
    """Neither the id map nor the registry knows this Confluent schema id."""


class RegistryUnavailable(SchemaError):
    """The registry could not be asked (network, HTTP 5xx, bad answer): try again later."""


class Schema:
    """One schema version: its JSON, its parsed (logical-type-free) form, its fingerprint.

    ``version`` is the history version (``history/<Name>/v<N>.avsc``), or None for the
    working copy and for schemas learned at runtime.
    """

    __slots__ = ("canonical", "fingerprint", "name", "parsed", "source", "version")

    def __init__(self, source: dict[str, Any], version: int | None = None) -> None:
        if not isinstance(source, dict) or source.get("type") != "record":
            raise SchemaError("a paysaga schema must be an Avro record")
        self.source = source
        namespace = source.get("namespace")
        self.name = (
            source["name"]
            if "." in source["name"]
            else (f"{namespace}.{source['name']}" if namespace else full_name(source["name"]))
        )
        self.version = version
        self.canonical = to_parsing_canonical_form(source)
        self.fingerprint = fingerprint(source)
        # Parsed once with fastavro's "already parsed" marker (the default), so
        # schemaless_reader/writer do not re-parse the schema on every call.
        # A record schema parses to a dict (fastavro types any schema: str | list | dict).
        self.parsed = cast(
            "dict[str, Any]", parse_schema(strip_logical_types(source), named_schemas={})
        )

    def __repr__(self) -> str:
        version = "current" if self.version is None else f"v{self.version}"
        return f"Schema({self.name} {version} {self.fingerprint.hex()})"


IdMapValue = str | tuple[str, int]


class SchemaRegistry:
    """Shipped schemas plus Confluent id resolution (id map first, then the registry URL).

    ``id_map`` maps a Confluent schema id to a record name (its current version) or to
    ``(name, version)`` (a history version). With ``registry_url``, other ids are fetched
    from ``GET {url}/schemas/ids/{id}`` once and cached.
    """

    def __init__(
        self,
        id_map: Mapping[int, IdMapValue] | None = None,
        registry_url: str | None = None,
        timeout: float = 2.0,
    ) -> None:
        self._current: dict[str, Schema] = {}
        self._history: dict[str, dict[int, Schema]] = {}
        self._by_fp: dict[bytes, Schema] = {}
        self._by_id: dict[int, Schema] = {}
        self._missing: dict[int, float] = {}
        self._registry_url = registry_url.rstrip("/") if registry_url else None
        self._timeout = timeout
        self._lock = threading.Lock()
        self._load_shipped()
        for schema_id, target in (id_map or {}).items():
            if isinstance(target, tuple):
                self._by_id[int(schema_id)] = self.version(*target)
            else:
                self._by_id[int(schema_id)] = self.reader(target)

    def _load_shipped(self) -> None:
        root = resources.files("paysaga.schemas")
        # Current versions first: a history file identical to its working copy then maps
        # to the same Schema object, so the codec sees "writer is reader" and skips resolution.
        for entry in sorted(root.iterdir(), key=lambda e: e.name):
            if entry.name.endswith(".avsc"):
                schema = self.add(_load_json(entry))
                self._current[schema.name] = schema
        history = root.joinpath("history")
        if not history.is_dir():
            return
        # history/<Name>.v<N>.avsc: one flat folder, so it installs as one package's data.
        for entry in sorted(history.iterdir(), key=lambda e: e.name):
            stem, _, version = entry.name.removesuffix(".avsc").rpartition(".v")
            if entry.name.endswith(".avsc") and stem and version.isdigit():
                schema = Schema(_load_json(entry), version=int(version))
                self._by_fp.setdefault(schema.fingerprint, schema)
                self._history.setdefault(schema.name, {})[int(version)] = schema

    def add(self, source: dict[str, Any] | Schema) -> Schema:
        """Register one more writer schema version (e.g. one a producer fleet still uses).

        Returns the registered Schema for that fingerprint (an existing one if known).
        """
        schema = source if isinstance(source, Schema) else Schema(source)
        return self._by_fp.setdefault(schema.fingerprint, schema)

    def names(self) -> list[str]:
        """Full names of the current records, sorted."""
        return sorted(self._current)

    def reader(self, name: str) -> Schema:
        """The current (reader) version of record ``name`` (short or full name)."""
        try:
            return self._current[full_name(name)]
        except KeyError:
            raise SchemaError(f"no schema named {name!r}") from None

    def history(self, name: str) -> dict[int, Schema]:
        """Released versions of record ``name`` by version number (may be empty)."""
        return dict(self._history.get(full_name(name), {}))

    def version(self, name: str, version: int) -> Schema:
        """Released version ``version`` of record ``name``."""
        try:
            return self._history[full_name(name)][version]
        except KeyError:
            raise SchemaError(f"no released version {version} of {name!r}") from None

    def latest_release(self, name: str) -> Schema | None:
        """The highest released version of ``name``, or None if it was never released."""
        versions = self._history.get(full_name(name))
        return versions[max(versions)] if versions else None

    def by_fingerprint(self, fp: bytes) -> Schema | None:
        """The writer schema with this 8-byte little-endian CRC-64-AVRO fingerprint."""
        return self._by_fp.get(bytes(fp))

    def by_id(self, schema_id: int) -> Schema | None:
        """The writer schema for a Confluent id: id map, cache, then the registry URL.

        Returns None when no registry is configured and the id is not mapped. Raises
        :class:`UnknownSchemaId` when the registry says the id does not exist, and
        :class:`RegistryUnavailable` when it cannot be asked.
        """
        schema = self._by_id.get(schema_id)
        if schema is not None or self._registry_url is None:
            return schema
        with self._lock:
            schema = self._by_id.get(schema_id)
            if schema is not None:
                return schema
            expiry = self._missing.get(schema_id)
            if expiry is not None and expiry > time.monotonic():
                raise UnknownSchemaId(f"schema registry has no schema id {schema_id}")
            try:
                schema = self.add(self._fetch(schema_id))
            except UnknownSchemaId:
                if len(self._missing) > 10_000:
                    self._missing.clear()
                self._missing[schema_id] = time.monotonic() + MISSING_ID_TTL_S
                raise
            self._by_id[schema_id] = schema
            return schema

    def _fetch(self, schema_id: int) -> Schema:
        url = f"{self._registry_url}/schemas/ids/{schema_id}"
        try:
            with urllib.request.urlopen(url, timeout=self._timeout) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise UnknownSchemaId(
                    f"schema registry has no schema id {schema_id} (HTTP 404)"
                ) from None
            raise RegistryUnavailable(
                f"schema registry answered HTTP {exc.code} for schema id {schema_id}"
            ) from None
        except (OSError, ValueError) as exc:
            raise RegistryUnavailable(
                f"schema registry {self._registry_url} unreachable or invalid "
                f"for schema id {schema_id}: {type(exc).__name__}"
            ) from None
        if not isinstance(body, dict) or not isinstance(body.get("schema"), str):
            raise RegistryUnavailable(f"schema registry answer for id {schema_id} has no schema")
        if body.get("schemaType", "AVRO") != "AVRO":
            raise UnknownSchemaId(f"schema id {schema_id} is {body['schemaType']}, not AVRO")
        try:
            return Schema(json.loads(body["schema"]))
        except Exception as exc:  # fastavro raises many types on a bad schema
            raise UnknownSchemaId(
                f"schema id {schema_id} is not a usable Avro record schema ({type(exc).__name__})"
            ) from None


def _load_json(entry: Any) -> dict[str, Any]:
    try:
        return json.loads(entry.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise SchemaError(f"invalid JSON in shipped schema {entry.name}: {exc}") from None
