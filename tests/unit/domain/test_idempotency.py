"""Idempotency decisions: fingerprints of the request body, NEW / REPLAY / CONFLICT, expiry."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from paysaga.domain.idempotency import (
    ENVELOPE_FIELDS,
    Decision,
    KeyRecord,
    decide,
    fingerprint,
    scope_key,
)
from paysaga.schemas.models import PaymentInitiated
from tests.samples import initiated

ENVELOPE = sorted(ENVELOPE_FIELDS)
#: Strings as a validated request can carry them (pydantic refuses lone surrogates).
text = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=10,
)
business_keys = text.filter(lambda k: k not in ENVELOPE_FIELDS)
requests = st.dictionaries(business_keys, json_values, max_size=8)
envelopes = st.fixed_dictionaries(
    {},
    optional={
        "event_id": text,
        "occurred_at": st.integers(0, 2**63),
        "causation_id": st.none() | text,
    },
)


def canonical(v: Any) -> str:
    return json.dumps(v, sort_keys=True)


@settings(max_examples=200, deadline=None)
@given(body=requests, env1=envelopes, env2=envelopes)
def test_fingerprint_ignores_the_envelope(body: dict, env1: dict, env2: dict) -> None:
    fp = fingerprint({**body, **env1})
    assert fp == fingerprint({**env2, **body}) == fingerprint(body)
    assert fp == fingerprint(dict(reversed(list({**body, **env1}.items()))))  # order-free
    assert len(fp) == 64 and int(fp, 16) >= 0


@settings(max_examples=200, deadline=None)
@given(body=requests.filter(bool), data=st.data())
def test_fingerprint_changes_with_any_business_field(body: dict, data: st.DataObject) -> None:
    key = data.draw(st.sampled_from(sorted(body)), label="field")
    other = data.draw(json_values, label="other value")
    assume(canonical(other) != canonical(body[key]))
    assert fingerprint({**body, key: other}) != fingerprint(body)
    without = {k: v for k, v in body.items() if k != key}
    assert fingerprint(without) != fingerprint(body)  # a missing field is another request
    extra = data.draw(business_keys.filter(lambda k: k not in body), label="new field")
    assert fingerprint({**body, extra: data.draw(json_values)}) != fingerprint(body)


def test_fingerprint_distinguishes_types_that_compare_equal() -> None:
    assert len({fingerprint({"a": v}) for v in (1, 1.0, True, "1", [1], None)}) == 6


def test_fingerprint_of_real_requests() -> None:
    sample = PaymentInitiated.model_validate(initiated(1)[0]).to_avro()
    retry = {
        **sample,
        "event_id": "00000000-0000-4000-8000-000000000000",
        "occurred_at": sample["occurred_at"] + 5_000,
        "causation_id": "retry",
    }
    assert fingerprint(retry) == fingerprint(sample)
    for name, value in [
        ("amount_minor", sample["amount_minor"] + 1),
        ("payment_id", "pay_other"),
        ("currency", "EUR"),
        ("metadata", {}),
        ("capture_mode", "MANUAL"),
    ]:
        assert fingerprint({**sample, name: value}) != fingerprint(sample), name


TTL = 24 * 3600 * 1000


@settings(max_examples=200, deadline=None)
@given(first=st.integers(0, 2**50), ttl=st.integers(1, 10 * TTL), data=st.data())
def test_decide_new_replay_conflict_and_expiry(first: int, ttl: int, data: st.DataObject) -> None:
    decision, stored = decide(None, "fp", "pay-1", "ev-1", first, ttl)
    assert decision is Decision.NEW
    assert stored == KeyRecord("fp", "pay-1", "ev-1", first + ttl)
    assert KeyRecord.from_json(json.loads(json.dumps(stored.to_json()))) == stored
    # while alive (including events out of order, before the first sight)
    alive = data.draw(st.integers(first - ttl, first + ttl - 1), label="alive at")
    assert decide(stored, "fp", "pay-2", "ev-2", alive, ttl) == (Decision.REPLAY, None)
    assert decide(stored, "fp2", "pay-1", "ev-3", alive, ttl) == (Decision.CONFLICT, None)
    # from its expiry on, the key is free again: whatever the fingerprint
    later = data.draw(st.integers(first + ttl, first + 3 * ttl), label="expired at")
    fp = data.draw(st.sampled_from(["fp", "fp2"]))
    decision, renewed = decide(stored, fp, "pay-3", "ev-4", later, ttl)
    assert decision is Decision.NEW
    assert renewed == KeyRecord(fp, "pay-3", "ev-4", later + ttl)


def test_decide_at_the_exact_expiry_is_new() -> None:
    stored = KeyRecord("fp", "p", "e", 1_000)
    assert decide(stored, "other", "p2", "e2", 999, TTL)[0] is Decision.CONFLICT
    assert decide(stored, "other", "p2", "e2", 1_000, TTL)[0] is Decision.NEW


merchant_ids = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\x1f"), min_size=1, max_size=16
)
keys = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=16)


@settings(max_examples=200, deadline=None)
@given(a=st.tuples(merchant_ids, keys), b=st.tuples(merchant_ids, keys))
def test_scope_key_separates_merchants(a: tuple[str, str], b: tuple[str, str]) -> None:
    assert (scope_key(*a) == scope_key(*b)) == (a == b)
    length, rest = scope_key(*a).split(":", 1)
    assert (rest[: int(length)], rest[int(length) + 1 :]) == a


def test_same_key_in_two_merchants_is_two_scopes() -> None:
    assert scope_key("m_001", "idem-1") != scope_key("m_002", "idem-1")


def test_scope_key_separates_every_merchant_the_edge_accepts() -> None:
    sample = initiated(1)[0]
    one = PaymentInitiated.model_validate(
        {**sample, "merchant_id": "m\x1fa", "idempotency_key": "k"}
    )
    two = PaymentInitiated.model_validate(
        {**sample, "merchant_id": "m", "idempotency_key": "a\x1fk"}
    )
    assert (one.merchant_id, one.idempotency_key) != (two.merchant_id, two.idempotency_key)
    assert scope_key(one.merchant_id, one.idempotency_key) != scope_key(
        two.merchant_id, two.idempotency_key
    )
