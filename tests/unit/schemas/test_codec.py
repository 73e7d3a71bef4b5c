"""Unit tests for the Avro codec and schema registry (no Kafka).

Every shipped record round-trips in both framings, old writers are resolved to the current
reader, and every way a payload can be wrong ends as a `DecodeError` with a reason code.
"""

from __future__ import annotations

import contextlib
import copy
import json
import socket
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from fastavro import schemaless_reader
from fastavro.schema import fingerprint as fastavro_fingerprint
from fastavro.schema import to_parsing_canonical_form
from faust.serializers import codecs as faust_codecs
from hypothesis import given, settings
from hypothesis import strategies as st

from paysaga.schemas.codec import AvroCodec, DecodeError, EncodeError
from paysaga.schemas.faust_codec import register_faust_codecs
from paysaga.schemas.registry import Schema, SchemaError, SchemaRegistry, fingerprint
from tests.samples import initiated

SCHEMAS = Path(__file__).resolve().parents[3] / "schemas"
REGISTRY = SchemaRegistry()
NAMES = REGISTRY.names()
REGISTRY_CODEC = AvroCodec(REGISTRY)
ID_MAP_CODEC = AvroCodec(SchemaRegistry(id_map={5: "PaymentInitiated"}))
PRIMITIVE_SAMPLES: dict[str, Any] = {
    "null": None,
    "boolean": True,
    "int": 7,
    "long": 2**40 + 3,
    "float": 0.5,
    "double": 1.25,
    "bytes": b"\x01\x02",
    "string": "sample",
}


def sample(schema: Any, named: dict[str, Any] | None = None, namespace: str = "") -> Any:
    """A valid value for `schema` (Avro JSON), choosing the first useful option everywhere."""
    named = {} if named is None else named
    if isinstance(schema, str):
        if schema in PRIMITIVE_SAMPLES:
            return PRIMITIVE_SAMPLES[schema]
        full = schema if "." in schema else f"{namespace}.{schema}"
        return sample(named.get(full, named.get(schema)), named, namespace)
    if isinstance(schema, list):
        branch = next(b for b in schema if b != "null")
        return sample(branch, named, namespace)
    logical = schema.get("logicalType")
    if logical == "uuid":
        return str(uuid.UUID(int=0x1234, version=4))
    if logical == "timestamp-millis":
        return 1_700_000_000_123
    kind = schema["type"]
    if kind in ("record", "enum", "fixed"):
        namespace = schema.get("namespace", namespace)
        named[f"{namespace}.{schema['name']}"] = schema
        named[schema["name"]] = schema
    if kind == "record":
        return {f["name"]: sample(f["type"], named, namespace) for f in schema["fields"]}
    if kind == "enum":
        return schema["symbols"][0]
    if kind == "fixed":
        return b"\x00" * schema["size"]
    if kind == "array":
        return [sample(schema["items"], named, namespace)]
    if kind == "map":
        return {"key": sample(schema["values"], named, namespace)}
    return sample(kind, named, namespace)


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


@pytest.fixture
def codec() -> AvroCodec:
    return AvroCodec(SchemaRegistry())


def test_registry_knows_every_shipped_schema() -> None:
    files = sorted(p.stem for p in SCHEMAS.glob("*.avsc"))
    assert [n.rsplit(".", 1)[-1] for n in NAMES] == files
    assert len(NAMES) >= 15


@pytest.mark.parametrize("name", NAMES)
def test_fingerprint_is_crc64_avro_of_canonical_form(name: str) -> None:
    schema = REGISTRY.reader(name)
    canonical = to_parsing_canonical_form(schema.source)
    assert schema.fingerprint == bytes.fromhex(fastavro_fingerprint(canonical, "CRC-64-AVRO"))
    assert len(schema.fingerprint) == 8


def test_fingerprint_spec_vector() -> None:
    # CRC-64-AVRO of the canonical form "int" is 0x7275d51a3f395c8f, little-endian on the wire.
    assert fingerprint("int") == (0x7275D51A3F395C8F).to_bytes(8, "little")


@pytest.mark.parametrize("name", NAMES)
def test_single_object_round_trip(codec: AvroCodec, name: str) -> None:
    source = codec.registry.reader(name).source
    record = sample(source)
    assert set(record) == {f["name"] for f in source["fields"]}
    data = codec.encode(name, record)
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == codec.registry.reader(name).fingerprint
    assert codec.decode(data, name) == record


@pytest.mark.parametrize("name", NAMES)
def test_confluent_round_trip(name: str) -> None:
    codec = AvroCodec(SchemaRegistry(id_map={5: name}))
    record = sample(codec.registry.reader(name).source)
    data = codec.encode_confluent(name, record, 5)
    assert data[:5] == b"\x00\x00\x00\x00\x05"
    assert codec.decode(data, name) == record


def test_decode_accepts_full_name(codec: AvroCodec) -> None:
    record = initiated(1)[0]
    data = codec.encode("PaymentInitiated", record)
    assert codec.decode(data, "io.paysaga.PaymentInitiated") == record


def test_samples_round_trip(codec: AvroCodec) -> None:
    for record in initiated(5):
        assert codec.decode(codec.encode("PaymentInitiated", record), "PaymentInitiated") == record


def test_old_writer_new_reader(codec: AvroCodec) -> None:
    v1_source = load(SCHEMAS / "history" / "PaymentInitiated.v1.avsc")
    v1 = Schema(v1_source)
    v1_fields = {f["name"] for f in v1_source["fields"]}
    assert {"device_id", "description", "metadata"}.isdisjoint(v1_fields)
    event = initiated(1)[0]
    old = {k: v for k, v in event.items() if k in v1_fields}

    data = codec.encode_with(v1, old)
    assert data[2:10] == v1.fingerprint != codec.registry.reader("PaymentInitiated").fingerprint
    decoded = codec.decode(data, "PaymentInitiated")

    assert decoded["device_id"] is None
    assert decoded["description"] is None
    assert decoded["metadata"] == {}
    assert {k: decoded[k] for k in old} == old


def test_every_history_version_is_a_known_writer(codec: AvroCodec) -> None:
    for path in SCHEMAS.glob("history/*.v*.avsc"):
        schema = Schema(load(path))
        assert codec.registry.by_fingerprint(schema.fingerprint) is not None, path


def reason(codec: AvroCodec, data: bytes, name: str = "PaymentInitiated") -> str:
    with pytest.raises(DecodeError) as info:
        codec.decode(data, name)
    assert isinstance(info.value, ValueError)
    return info.value.reason


def test_empty_payload(codec: AvroCodec) -> None:
    assert reason(codec, b"") == "empty"


def test_unknown_magic(codec: AvroCodec) -> None:
    assert reason(codec, b"\x13garbage") == "unknown-magic"


def test_unknown_fingerprint(codec: AvroCodec) -> None:
    unknown = b"\xff" * 8
    assert codec.registry.by_fingerprint(unknown) is None
    assert reason(codec, b"\xc3\x01" + unknown + b"\x02") == "unknown-fingerprint"


def test_unknown_schema_id(codec: AvroCodec) -> None:
    assert reason(codec, b"\x00" + (999).to_bytes(4, "big") + b"x") == "unknown-schema-id"


@pytest.mark.parametrize("data", [b"\xc3\x01", b"\xc3\x01\x00\x01\x02", b"\x00", b"\x00\x00\x01"])
def test_short_headers(codec: AvroCodec, data: bytes) -> None:
    assert reason(codec, data) == "truncated"


def test_truncated_body(codec: AvroCodec) -> None:
    data = codec.encode("PaymentInitiated", initiated(1)[0])
    assert reason(codec, data[: len(data) // 2]) in {"truncated", "invalid-avro"}
    assert reason(codec, data[:-1]) in {"truncated", "invalid-avro"}


def test_trailing_bytes(codec: AvroCodec) -> None:
    data = codec.encode("PaymentInitiated", initiated(1)[0])
    assert reason(codec, data + b"\x00") == "trailing-bytes"


def test_wrong_record(codec: AvroCodec) -> None:
    record = sample(codec.registry.reader("PaymentStatusChanged").source)
    data = codec.encode("PaymentStatusChanged", record)
    assert reason(codec, data, "PaymentInitiated") == "wrong-record"


def test_wrong_record_confluent() -> None:
    codec = AvroCodec(SchemaRegistry(id_map={5: "PaymentStatusChanged"}))
    record = sample(codec.registry.reader("PaymentStatusChanged").source)
    data = codec.encode_confluent("PaymentStatusChanged", record, 5)
    assert reason(codec, data, "PaymentInitiated") == "wrong-record"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_only_raise_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        REGISTRY_CODEC.decode(data, "PaymentInitiated")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_body_after_valid_header_only_raises_decode_error(body: bytes) -> None:
    header = b"\xc3\x01" + REGISTRY.reader("PaymentInitiated").fingerprint
    with contextlib.suppress(DecodeError):
        REGISTRY_CODEC.decode(header + body, "PaymentInitiated")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_body_after_confluent_header_only_raises_decode_error(body: bytes) -> None:
    with contextlib.suppress(DecodeError):
        ID_MAP_CODEC.decode(b"\x00\x00\x00\x00\x05" + body, "PaymentInitiated")


class _FakeRegistry(BaseHTTPRequestHandler):
    """GET /schemas/ids/<id> answers from `bodies`; unknown ids get a 404."""

    bodies: dict[int, Any] = {}
    requests: list[str] = []

    def do_GET(self) -> None:
        self.requests.append(self.path)
        prefix = "/schemas/ids/"
        body = None
        if self.path.startswith(prefix) and self.path[len(prefix) :].isdigit():
            body = self.bodies.get(int(self.path[len(prefix) :]))
        if body is None:
            self.send_response(404)
            self.end_headers()
            return
        payload = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def registry_server() -> Iterator[tuple[str, type[_FakeRegistry]]]:
    handler = type("Handler", (_FakeRegistry,), {"bodies": {}, "requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_confluent_registry_url(registry_server: tuple[str, type[_FakeRegistry]]) -> None:
    url, handler = registry_server
    handler.bodies[42] = {"schema": (SCHEMAS / "PaymentInitiated.avsc").read_text()}
    codec = AvroCodec(SchemaRegistry(registry_url=url, timeout=5))
    record = initiated(1)[0]
    data = b"\x00" + (42).to_bytes(4, "big") + codec.encode("PaymentInitiated", record)[10:]

    assert codec.decode(data, "PaymentInitiated") == record
    assert codec.decode(data, "PaymentInitiated") == record
    assert handler.requests == ["/schemas/ids/42"]  # fetched once, then cached


def test_confluent_registry_old_writer(registry_server: tuple[str, type[_FakeRegistry]]) -> None:
    url, handler = registry_server
    v1_text = (SCHEMAS / "history" / "PaymentInitiated.v1.avsc").read_text()
    handler.bodies[7] = {"schema": v1_text}
    codec = AvroCodec(SchemaRegistry(registry_url=url, timeout=5))
    v1 = Schema(json.loads(v1_text))
    fields = {f["name"] for f in v1.source["fields"]}
    old = {k: v for k, v in initiated(1)[0].items() if k in fields}
    data = b"\x00" + (7).to_bytes(4, "big") + codec.encode_with(v1, old)[10:]

    decoded = codec.decode(data, "PaymentInitiated")
    assert decoded["metadata"] == {}
    assert decoded["device_id"] is None


def test_confluent_registry_missing_id(registry_server: tuple[str, type[_FakeRegistry]]) -> None:
    url, _ = registry_server
    codec = AvroCodec(SchemaRegistry(registry_url=url, timeout=5))
    assert reason(codec, b"\x00" + (43).to_bytes(4, "big") + b"\x02") == "unknown-schema-id"


@pytest.mark.parametrize(
    "body",
    [
        {"schema": json.dumps("string")},  # a primitive (e.g. key) schema
        {"schema": json.dumps({"type": "no-such-type", "name": "X"})},  # unparsable
        ["not", "an", "object"],
    ],
    ids=["primitive-schema", "unparsable-schema", "non-object-body"],
)
def test_confluent_registry_unusable_schema_is_decode_error(
    registry_server: tuple[str, type[_FakeRegistry]], body: Any
) -> None:
    url, handler = registry_server
    handler.bodies[44] = body
    codec = AvroCodec(SchemaRegistry(registry_url=url, timeout=5))
    with pytest.raises(DecodeError):
        codec.decode(b"\x00" + (44).to_bytes(4, "big") + b"\x02a", "PaymentInitiated")


def test_unreachable_registry() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The port is closed now: connecting is refused at once.
    codec = AvroCodec(SchemaRegistry(registry_url=f"http://127.0.0.1:{port}", timeout=2))
    with pytest.raises(DecodeError) as info:
        codec.decode(b"\x00" + (42).to_bytes(4, "big") + b"\x02", "PaymentInitiated")
    # A registry outage is transient (retry), unlike an id the registry does not know.
    assert info.value.reason == "registry-unavailable"


@pytest.fixture
def restore_faust_codecs() -> Iterator[None]:
    saved = dict(faust_codecs.codecs)
    yield
    faust_codecs.codecs.clear()
    faust_codecs.codecs.update(saved)


@pytest.mark.usefixtures("restore_faust_codecs")
def test_register_faust_codecs(codec: AvroCodec) -> None:
    names = register_faust_codecs(codec)
    assert sorted(names) == sorted(f"avro-{n.rsplit('.', 1)[-1]}" for n in NAMES)
    record = initiated(1)[0]
    data = faust_codecs.dumps("avro-PaymentInitiated", record)
    assert data[:2] == b"\xc3\x01"
    assert data == codec.encode("PaymentInitiated", record)
    assert faust_codecs.loads("avro-PaymentInitiated", data) == record


@pytest.mark.usefixtures("restore_faust_codecs")
def test_faust_codec_rejects_other_record(codec: AvroCodec) -> None:
    register_faust_codecs(codec)
    record = sample(codec.registry.reader("PaymentStatusChanged").source)
    data = faust_codecs.dumps("avro-PaymentStatusChanged", record)
    assert faust_codecs.loads("avro-PaymentStatusChanged", data) == record
    with pytest.raises(DecodeError) as info:
        faust_codecs.loads("avro-PaymentInitiated", data)
    assert info.value.reason == "wrong-record"


# -- resolution paths, id map versions, registry caching, encode errors ----------------------


def _v1_bytes(codec: AvroCodec) -> tuple[bytes, dict[str, Any]]:
    v1 = codec.registry.version("PaymentInitiated", 1)
    fields = {f["name"] for f in v1.source["fields"]}
    old = {k: v for k, v in initiated(1)[0].items() if k in fields}
    return codec.encode_with(v1, old), old


def test_additive_fast_path_equals_fastavro_resolution(codec: AvroCodec) -> None:
    data, _ = _v1_bytes(codec)
    v1 = codec.registry.version("PaymentInitiated", 1)
    current = codec.registry.reader("PaymentInitiated")
    expected = schemaless_reader(BytesIO(data[10:]), v1.parsed, current.parsed)
    assert codec.decode(data, "PaymentInitiated") == expected
    assert codec.decode(data, "PaymentInitiated") == expected  # cached plan, same answer


def test_non_additive_writer_uses_full_resolution(codec: AvroCodec) -> None:
    # An older writer with an int amount (promoted to long) and a field we dropped since.
    source = copy.deepcopy(codec.registry.reader("PaymentInitiated").source)
    for field in source["fields"]:
        if field["name"] == "amount_minor":
            field["type"] = "int"
    source["fields"].append({"name": "legacy_score", "type": "int"})
    writer = codec.registry.add(source)
    record = {**initiated(1)[0], "legacy_score": 3}
    decoded = codec.decode(codec.encode_with(writer, record), "PaymentInitiated")
    assert "legacy_score" not in decoded
    assert decoded == {k: v for k, v in record.items() if k != "legacy_score"}


def test_logical_types_stay_primitive(codec: AvroCodec) -> None:
    record = initiated(1)[0]
    decoded = codec.decode(codec.encode("PaymentInitiated", record), "PaymentInitiated")
    assert isinstance(decoded["event_id"], str)
    assert type(decoded["occurred_at"]) is int


def test_id_map_can_name_a_released_version() -> None:
    codec = AvroCodec(SchemaRegistry(id_map={9: ("PaymentInitiated", 1)}))
    single, old = _v1_bytes(codec)
    data = b"\x00" + (9).to_bytes(4, "big") + single[10:]
    decoded = codec.decode(data, "PaymentInitiated")
    assert decoded["metadata"] == {} and decoded["description"] is None
    assert {k: decoded[k] for k in old} == old


def test_registry_history_api() -> None:
    assert sorted(REGISTRY.history("PaymentInitiated")) == [1, 2, 3]
    latest = REGISTRY.latest_release("io.paysaga.PaymentInitiated")
    assert latest is not None and latest.version == 3
    assert latest.fingerprint == REGISTRY.reader("PaymentInitiated").fingerprint
    with pytest.raises(SchemaError):
        REGISTRY.version("PaymentInitiated", 99)
    with pytest.raises(SchemaError):
        REGISTRY.reader("NoSuchRecord")
    with pytest.raises(SchemaError):
        SchemaRegistry(id_map={1: "NoSuchRecord"})


def test_unknown_reader_name_is_a_programming_error(codec: AvroCodec) -> None:
    data = codec.encode("PaymentInitiated", initiated(1)[0])
    with pytest.raises(SchemaError):
        codec.decode(data, "NoSuchRecord")


def test_registry_404_is_remembered(registry_server: tuple[str, type[_FakeRegistry]]) -> None:
    url, handler = registry_server
    codec = AvroCodec(SchemaRegistry(registry_url=url, timeout=5))
    for _ in range(3):
        assert reason(codec, b"\x00" + (43).to_bytes(4, "big") + b"\x02") == "unknown-schema-id"
    assert handler.requests == ["/schemas/ids/43"]


def test_encode_error_does_not_echo_a_pan(codec: AvroCodec) -> None:
    pan = "4111111111111111"
    with pytest.raises(EncodeError) as info:
        codec.encode("PaymentInitiated", {**initiated(1)[0], "amount_minor": pan})
    assert pan not in str(info.value)
    with pytest.raises(EncodeError, match="payment_id"):
        codec.encode(
            "PaymentInitiated", {k: v for k, v in initiated(1)[0].items() if k != "payment_id"}
        )
    with pytest.raises(EncodeError):
        codec.encode_confluent("PaymentInitiated", initiated(1)[0], 2**32)


def test_decode_error_message_never_holds_body_bytes(codec: AvroCodec) -> None:
    pan = "4111111111111111"
    data = codec.encode("PaymentInitiated", initiated(1)[0]) + pan.encode()
    with pytest.raises(DecodeError) as info:
        codec.decode(data, "PaymentInitiated")
    assert info.value.reason == "trailing-bytes"
    assert pan not in str(info.value) and "1111" not in info.value.message
