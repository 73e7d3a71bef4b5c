"""Dead-letter headers: what every letter says, what it keeps, what a redrive carries.

The header builder alone, and `ProcessorContext.dead_letter`/`review` on the test driver
(real RocksDB, no broker).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiokafka.structs import ConsumerRecord

from paysaga.streams.engine import BadRecord, ProcessorContext, PunctuationType, Topology
from paysaga.streams.engine.deadletter import (
    H_ATTEMPTS,
    H_ERROR_CLASS,
    H_FAILED_AT,
    H_FIRST_FAILED_AT,
    H_KIND,
    H_LAST_FAILED_AT,
    H_OFFSET,
    H_ORIGIN_FIRST_FAILED_AT,
    H_ORIGIN_TOPIC,
    H_PARTITION,
    H_REASON,
    H_REDRIVE_COUNT,
    H_REDRIVE_ID,
    H_TOPIC,
    DeadLetter,
    default_error_class,
    original_headers,
    parse_headers,
)
from paysaga.streams.engine.driver import TopologyTestDriver


def test_a_letter_says_why_from_where_how_often_and_when() -> None:
    letter = DeadLetter("decode", "not avro", "t.payment.initiated", 2, 41, failed_at=1_000)
    h = parse_headers(letter.headers())
    assert h == {
        H_KIND: "decode", H_REASON: "not avro", H_ERROR_CLASS: "permanent",
        H_TOPIC: "t.payment.initiated", H_PARTITION: "2", H_OFFSET: "41", H_ATTEMPTS: "1",
        H_FIRST_FAILED_AT: "1000", H_LAST_FAILED_AT: "1000", H_FAILED_AT: "1000",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "given", "expected"),
    [
        ("decode", None, "permanent"),
        ("validation", None, "permanent"),
        ("transition", None, "permanent"),
        ("poison", None, "permanent"),
        ("saga", None, "unknown"),
        ("gateway", "transient", "transient"),
        ("decode", "transient", "transient"),  # the caller knows better than the default
    ],
)
def test_the_error_class_defaults_by_kind_or_is_given(
    kind: str, given: str | None, expected: str
) -> None:
    letter = DeadLetter(kind, "r", "t", 0, 0, error_class=given)
    assert parse_headers(letter.headers())[H_ERROR_CLASS] == expected
    if given is None:
        assert default_error_class(kind) == expected


def test_an_unknown_error_class_is_refused() -> None:
    with pytest.raises(ValueError, match="error class"):
        DeadLetter("decode", "r", "t", 0, 0, error_class="sometimes")


def test_the_inputs_headers_are_kept_prefixed_in_order_and_come_back_as_they_were() -> None:
    mine = (("trace", b"a"), ("paysaga.source", b"t.payment.requests"), ("trace", b"b"),
            ("paysaga.error.kind", b"forged"))  # fmt: skip
    headers = DeadLetter("decode", "r", "t", 0, 0, input_headers=mine, failed_at=5).headers()
    assert parse_headers(headers)[H_KIND] == "decode"  # ours, never the input's
    assert [k for k, _ in headers if k.startswith("paysaga.original.")] == [
        "paysaga.original.trace", "paysaga.original.paysaga.source",
        "paysaga.original.trace", "paysaga.original.paysaga.error.kind",
    ]  # fmt: skip
    assert original_headers(headers) == list(mine)


def test_a_redriven_input_carries_its_redrive_history_into_the_new_letter() -> None:
    redriven = (("trace", b"a"), (H_REDRIVE_ID, b"rid"), (H_REDRIVE_COUNT, b"1"),
                (H_ORIGIN_TOPIC, b"t.first"), (H_ORIGIN_FIRST_FAILED_AT, b"100"))  # fmt: skip
    headers = DeadLetter("decode", "r", "t.again", 1, 7, input_headers=redriven,
                         failed_at=900).headers()  # fmt: skip
    h = parse_headers(headers)
    assert h[H_REDRIVE_ID] == "rid" and h[H_REDRIVE_COUNT] == "1"
    assert h[H_ORIGIN_TOPIC] == "t.first" and h[H_TOPIC] == "t.again"
    assert (h[H_FIRST_FAILED_AT], h[H_LAST_FAILED_AT], h[H_FAILED_AT]) == ("100", "900", "900")
    # The redrive headers are the letter's history, not part of the original input.
    assert original_headers(headers) == [("trace", b"a")]


def test_a_mangled_first_failure_header_falls_back_to_this_failure() -> None:
    bad = ((H_ORIGIN_FIRST_FAILED_AT, b"yesterday"),)
    letter = DeadLetter("decode", "r", "t", 0, 0, input_headers=bad, failed_at=7)
    assert letter.first_failed_at == 7


def _decode(record: ConsumerRecord) -> dict[str, Any]:
    try:
        return dict(json.loads(record.value))
    except (TypeError, ValueError) as exc:
        raise BadRecord("decode", f"not JSON: {exc}") from exc


def test_the_context_dead_letters_with_the_original_key_bytes_and_headers(tmp_path: Path) -> None:
    topology = Topology()

    @topology.agent("strict", sources=["in"], decode=_decode)
    def strict(ctx: ProcessorContext, event: dict[str, Any]) -> None:
        if event.get("retry"):
            ctx.dead_letter("gateway", "try later", error_class="transient")
        elif event.get("refuse"):
            ctx.dead_letter("transition", "no such payment")  # the call sites of today

    driver = TopologyTestDriver(topology, tmp_path / "d")
    try:
        bad = driver.pipe("in", b"\xff", key=b"k", headers=[("trace", b"x")])
        later = driver.pipe("in", json.dumps({"retry": 1}).encode(), key=b"k2")
        refused = driver.pipe("in", json.dumps({"refuse": 1}).encode(), key=b"k3")
        assert [o.topic for o in bad + later + refused] == ["dlq"] * 3
        assert (bad[0].key, bad[0].value) == (b"k", b"\xff")
        assert original_headers(bad[0].headers) == [("trace", b"x")]
        h = parse_headers(bad[0].headers)
        assert h[H_ERROR_CLASS] == "permanent" and h[H_TOPIC] == "in"
        assert h[H_FIRST_FAILED_AT] == h[H_LAST_FAILED_AT] == h[H_FAILED_AT]
        assert parse_headers(later[0].headers)[H_ERROR_CLASS] == "transient"
        assert parse_headers(refused[0].headers)[H_ERROR_CLASS] == "permanent"
    finally:
        driver.close()


def test_a_review_record_takes_an_error_class_too(tmp_path: Path) -> None:
    topology = Topology()
    agent = topology.agent("quiet", sources=["in"])(lambda ctx, record: None)

    @agent.schedule(1_000, PunctuationType.STREAM_TIME)
    def check(ctx: ProcessorContext, now: int) -> None:
        ctx.review("saga", "in doubt", b"p1", b"{}", "payments")
        ctx.review("saga", "ask the bank", b"p2", b"{}", "payments", error_class="transient")

    driver = TopologyTestDriver(topology, tmp_path / "d")
    try:
        out = driver.pipe("in", b"x", key=b"k", timestamp=5_000)
        letters = [parse_headers(o.headers) for o in out if o.topic == "dlq"]
        assert [h[H_ERROR_CLASS] for h in letters] == ["unknown", "transient"]
        assert {h[H_OFFSET] for h in letters} == {"-1"}
    finally:
        driver.close()


def test_a_letter_with_an_earlier_failure_of_its_input_starts_there() -> None:
    letter = DeadLetter("poison", "r", "t", 0, 0, 2, failed_at=900, earlier_failure=500)
    h = parse_headers(letter.headers())
    assert (h[H_FIRST_FAILED_AT], h[H_LAST_FAILED_AT], h[H_ATTEMPTS]) == ("500", "900", "2")


def test_a_poison_record_is_dead_lettered_with_its_first_attempts_time(tmp_path: Path) -> None:
    topology = Topology()

    @topology.agent("fragile", sources=["in"])
    def fragile(ctx: ProcessorContext, record: ConsumerRecord) -> None:
        raise RuntimeError("bug")

    driver = TopologyTestDriver(topology, tmp_path / "d", wall_ms=1_234)
    try:
        out = driver.pipe("in", b"x", key=b"k", headers=[("trace", b"y")])
        [letter] = [o for o in out if o.topic == "dlq"]
        h = parse_headers(letter.headers)
        assert (h[H_KIND], h[H_ATTEMPTS], h[H_ERROR_CLASS]) == ("poison", "2", "permanent")
        assert h[H_FIRST_FAILED_AT] == h[H_LAST_FAILED_AT] == "1234"  # the driver's clock
        assert original_headers(letter.headers) == [("trace", b"y")]
    finally:
        driver.close()
