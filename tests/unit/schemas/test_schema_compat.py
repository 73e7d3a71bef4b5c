"""Schema evolution rules (schemas/README.md), checked with Apache `avro`'s compatibility checker.

BACKWARD: the newer schema as reader can read data written with the older one. Every
current schema must be BACKWARD compatible with its latest released version, and every
released version with all earlier ones.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from pathlib import Path
from typing import Any

import avro.schema
import pytest
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType

SCHEMAS = Path(__file__).resolve().parents[3] / "schemas"
HISTORY = SCHEMAS / "history"
CURRENT = sorted(p.stem for p in SCHEMAS.glob("*.avsc"))
_VERSION = re.compile(r"v([1-9][0-9]*)\.avsc")


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def versions(name: str) -> dict[int, Path]:
    """Released versions of `name` by number (history/<name>.vN.avsc)."""
    found = {}
    for path in HISTORY.glob(f"{name}.*.avsc"):
        match = _VERSION.fullmatch(path.name.removeprefix(f"{name}."))
        assert match, f"{path}: history files must be named <Name>.vN.avsc"
        found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def compatibility(reader: dict[str, Any], writer: dict[str, Any]) -> Any:
    return ReaderWriterCompatibilityChecker().get_compatibility(
        avro.schema.parse(json.dumps(reader)), avro.schema.parse(json.dumps(writer))
    )


def assert_backward(reader: dict[str, Any], writer: dict[str, Any], what: str) -> None:
    result = compatibility(reader, writer)
    assert result.compatibility is SchemaCompatibilityType.compatible, (
        f"{what}: {sorted(result.messages)} at {sorted(result.locations)}"
    )


def test_there_are_schemas() -> None:
    assert len(CURRENT) >= 15
    assert "PaymentInitiated" in CURRENT


@pytest.mark.parametrize("name", CURRENT)
def test_every_current_schema_has_history(name: str) -> None:
    numbers = list(versions(name))
    assert numbers, f"schemas/history/ has no {name}.vN.avsc: release v1 of the schema"
    assert numbers == list(range(1, len(numbers) + 1)), f"{name}: versions have gaps {numbers}"


@pytest.mark.parametrize("name", CURRENT)
def test_history_files_hold_that_record(name: str) -> None:
    current = load(SCHEMAS / f"{name}.avsc")
    assert current["name"] == name
    for number, path in versions(name).items():
        source = load(path)
        assert source["type"] == "record"
        assert source["name"] == name, f"{name} v{number} is a {source['name']}"
        assert source.get("namespace") == current.get("namespace")


@pytest.mark.parametrize("name", CURRENT)
def test_current_reads_latest_release(name: str) -> None:
    released = versions(name)
    assert released, f"{name} has no released version"
    latest = max(released)
    assert_backward(
        load(SCHEMAS / f"{name}.avsc"), load(released[latest]), f"{name} current vs v{latest}"
    )


def _release_pairs() -> list[Any]:
    pairs = []
    for name in CURRENT:
        for old, new in itertools.combinations(versions(name), 2):
            pairs.append(pytest.param(name, old, new, id=f"{name}-v{new}-reads-v{old}"))
    return pairs


@pytest.mark.parametrize(("name", "old", "new"), _release_pairs())
def test_release_reads_every_earlier_release(name: str, old: int, new: int) -> None:
    released = versions(name)
    assert_backward(load(released[new]), load(released[old]), f"{name} v{new} vs v{old}")


def test_there_is_at_least_one_release_pair() -> None:
    # PaymentInitiated has v1 and v2: the pair test above must not be vacuous.
    assert _release_pairs()


# -- the checker can fail ------------------------------------------------------------------


def _initiated() -> dict[str, Any]:
    return load(SCHEMAS / "PaymentInitiated.avsc")


def test_adding_required_field_is_incompatible() -> None:
    writer = _initiated()
    reader = copy.deepcopy(writer)
    reader["fields"].append({"name": "risk_score", "type": "int"})
    result = compatibility(reader, writer)
    assert result.compatibility is SchemaCompatibilityType.incompatible


def test_adding_field_with_default_is_compatible() -> None:
    writer = _initiated()
    reader = copy.deepcopy(writer)
    reader["fields"].append({"name": "risk_score", "type": ["null", "int"], "default": None})
    assert_backward(reader, writer, "optional field added")


def test_changing_a_field_type_is_incompatible() -> None:
    writer = _initiated()
    reader = copy.deepcopy(writer)
    field = next(f for f in reader["fields"] if f["name"] == "amount_minor")
    field["type"] = "string"
    result = compatibility(reader, writer)
    assert result.compatibility is SchemaCompatibilityType.incompatible


def test_removing_an_enum_symbol() -> None:
    writer = _initiated()
    reader = copy.deepcopy(writer)
    enum = next(f for f in reader["fields"] if f["name"] == "capture_mode")["type"]
    enum["symbols"] = ["AUTOMATIC"]
    # With an enum default the reader maps the unknown symbol to it: still compatible ...
    assert_backward(reader, writer, "enum symbol removed, enum has a default")
    # ... without one, data written with the removed symbol cannot be read.
    del enum["default"]
    result = compatibility(reader, writer)
    assert result.compatibility is SchemaCompatibilityType.incompatible


# -- the contract every schema keeps (docs/contract.md#events) -----------------------------

ENVELOPE = ["event_id", "occurred_at", "payment_id", "correlation_id", "causation_id"]
#: Records keyed by something other than a payment: no full envelope.
NO_ENVELOPE = {
    "BreakerTransition",
    "BankStatementLine",
    "ReconciliationReport",
    "ReconciliationDiscrepancy",
    "SettlementBatch",
}
_FORBIDDEN_FIELD = re.compile(r"(^|_)(pan|cvv|cvc|cvv2|card_number|cardnumber)($|_)")


def _walk(schema: Any) -> Any:
    """Every schema node (dicts) below and including `schema`."""
    if isinstance(schema, list):
        for branch in schema:
            yield from _walk(branch)
    elif isinstance(schema, dict):
        yield schema
        for field in schema.get("fields", []):
            yield field
            yield from _walk(field["type"])
        for key in ("items", "values"):
            if key in schema:
                yield from _walk(schema[key])


@pytest.mark.parametrize("name", CURRENT)
def test_envelope_comes_first(name: str) -> None:
    fields = load(SCHEMAS / f"{name}.avsc")["fields"]
    if name in NO_ENVELOPE:
        return
    assert [f["name"] for f in fields[:5]] == ENVELOPE
    assert fields[0]["type"] == {"type": "string", "logicalType": "uuid"}
    assert fields[1]["type"] == {"type": "long", "logicalType": "timestamp-millis"}
    assert fields[4]["type"] == ["null", "string"] and fields[4]["default"] is None


@pytest.mark.parametrize("name", CURRENT)
def test_namespace_and_file_name(name: str) -> None:
    source = load(SCHEMAS / f"{name}.avsc")
    assert source["namespace"] == "io.paysaga" and source["name"] == name


@pytest.mark.parametrize("name", CURRENT)
def test_enums_have_a_default_symbol(name: str) -> None:
    for node in _walk(load(SCHEMAS / f"{name}.avsc")):
        if node.get("type") == "enum":
            assert node.get("default") in node["symbols"], f"{name}.{node['name']}"


@pytest.mark.parametrize("name", CURRENT)
def test_money_is_integer_minor_units_never_float(name: str) -> None:
    for node in _walk(load(SCHEMAS / f"{name}.avsc")):
        assert node.get("type") not in ("float", "double"), name
        if "name" in node and node["name"].endswith("_minor"):
            assert node["type"] in ("long", ["null", "long"]), f"{name}.{node['name']}"


@pytest.mark.parametrize("name", CURRENT)
def test_no_card_number_or_cvv_fields(name: str) -> None:
    for node in _walk(load(SCHEMAS / f"{name}.avsc")):
        if "name" in node:
            assert not _FORBIDDEN_FIELD.search(node["name"].lower()), f"{name}.{node['name']}"


def test_forbidden_field_pattern_bites() -> None:
    assert all(_FORBIDDEN_FIELD.search(n) for n in ("pan", "card_pan", "cvv", "card_number"))
    assert not any(_FORBIDDEN_FIELD.search(n) for n in ("card_token", "company", "panel_id"))
