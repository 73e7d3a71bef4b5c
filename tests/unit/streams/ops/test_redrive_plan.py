"""Redrive planning without a broker: parsing letters, filters, the ledger, the cap, the
target partition and the headers a redriven record carries."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from aiokafka.structs import ConsumerRecord

from paysaga.domain.payment import derived_id
from paysaga.streams.engine.deadletter import (
    H_FAILED_AT,
    H_KIND,
    H_OFFSET,
    H_ORIGIN_FIRST_FAILED_AT,
    H_ORIGIN_OFFSET,
    H_ORIGIN_PARTITION,
    H_ORIGIN_TOPIC,
    H_PARTITION,
    H_REDRIVE_COUNT,
    H_REDRIVE_DLQ,
    H_REDRIVE_ID,
    H_TOPIC,
    DeadLetter,
    parse_headers,
)
from paysaga.streams.engine.partitioner import partition_for
from paysaga.streams.ops.redrive import (
    Action,
    Filters,
    Letter,
    OffsetRange,
    Outcome,
    Step,
    ledger_entry,
    ledger_of,
    letter_of,
    parse_offsets,
    parse_time,
    plan,
    redrive_headers,
    redrive_id,
    render_plan,
    target_partition,
)

SRC = "t.payment.requests"
PARTS = {SRC: 3, "t.payment.initiated": 3}


def record(
    partition: int,
    offset: int,
    headers: list[tuple[str, bytes]],
    key: bytes | None = b"pay_1",
    value: bytes | None = b"\x00bytes",
) -> ConsumerRecord:
    return ConsumerRecord("t.payment.dlq", partition, offset, 0, 0, key, value, None,
                          len(key or b""), len(value or b""), tuple(headers))  # fmt: skip


def letter(
    partition: int = 0,
    offset: int = 0,
    *,
    kind: str = "transition",
    error_class: str | None = None,
    topic: str = SRC,
    source_partition: int = 1,
    source_offset: int = 10,
    at: int = 1_000,
    carried: tuple = (),
    original: tuple = (("trace", b"t1"),),
    key: bytes | None = b"pay_1",
    resume_topic: str | None = None,
) -> Letter:
    dl = DeadLetter(kind, "why", topic, source_partition, source_offset,
                    error_class=error_class, input_headers=(*original, *carried),
                    failed_at=at, resume_topic=resume_topic)  # fmt: skip
    return letter_of(record(partition, offset, dl.headers(), key=key))


def test_a_letter_is_parsed_from_its_headers() -> None:
    le = letter(2, 7, at=5_000)
    assert (le.ref, le.kind, le.error_class) == ("2:7", "transition", "permanent")
    assert (le.source.topic, le.source.partition, le.source.offset) == (SRC, 1, 10)
    assert le.origin == le.source and le.redrive_count == 0
    assert le.first_failed_at == le.last_failed_at == 5_000


def test_a_letter_of_the_first_header_set_gets_stand_ins() -> None:
    old = [(H_KIND, b"decode"), (H_TOPIC, SRC.encode()), (H_PARTITION, b"0"),
           (H_OFFSET, b"0"), (H_FAILED_AT, b"42")]  # fmt: skip
    le = letter_of(record(0, 3, old))
    assert le.error_class == "permanent" and le.source.offset == 0
    assert le.first_failed_at == le.last_failed_at == 42 and le.redrive_count == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0:5-9", OffsetRange(0, 5, 9)),
        ("2:5-", OffsetRange(2, 5, None)),
        ("1:4", OffsetRange(1, 4, 4)),
    ],
)
def test_offsets_ranges(text: str, expected: OffsetRange) -> None:
    assert parse_offsets(text) == expected


@pytest.mark.parametrize("text", ["5", "a:1-2", "0:9-5", "-1:0-3", "0:"])
def test_bad_offsets_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="--offsets"):
        parse_offsets(text)


def test_times_are_epoch_ms_or_iso_8601_utc_unless_said() -> None:
    assert parse_time("1700000000000") == 1_700_000_000_000
    assert parse_time("2023-11-14T22:13:20Z") == 1_700_000_000_000
    assert parse_time("2023-11-14T22:13:20") == 1_700_000_000_000
    assert parse_time("2023-11-14T23:13:20+01:00") == 1_700_000_000_000
    with pytest.raises(ValueError):
        parse_time("yesterday")


def test_filters_by_kind_class_topic_time_and_offsets() -> None:
    a = letter(0, 1, kind="decode", topic="t.payment.initiated", at=1_000)
    b = letter(0, 2, kind="transition", at=2_000)
    c = letter(1, 3, kind="gateway", error_class="transient", at=3_000)
    every = [a, b, c]

    def kept(f: Filters) -> list[str]:
        return [le.ref for le in every if f.accepts(le)]

    assert kept(Filters()) == ["0:1", "0:2", "1:3"]
    assert kept(Filters(kinds=frozenset({"decode", "gateway"}))) == ["0:1", "1:3"]
    assert kept(Filters(error_classes=frozenset({"transient"}))) == ["1:3"]
    assert kept(Filters(source_topics=frozenset({SRC}))) == ["0:2", "1:3"]
    assert kept(Filters(since=2_000)) == ["0:2", "1:3"]  # inclusive
    assert kept(Filters(until=2_000)) == ["0:1"]  # exclusive
    assert kept(Filters(offsets=(OffsetRange(0, 2, None), OffsetRange(1, 3, 3)))) == ["0:2", "1:3"]
    assert kept(Filters(kinds=frozenset({"decode"}), since=2_000)) == []
    with pytest.raises(ValueError, match="error-class"):
        Filters(error_classes=frozenset({"flaky"}))


def test_the_plan_decides_in_order_filter_ledger_review_cap_topic() -> None:
    carried = ((H_REDRIVE_COUNT, b"3"),)
    letters = [
        letter(0, 0, kind="decode"),  # filtered out
        letter(0, 1),  # done: in the ledger
        letter(0, 2, kind="saga", topic="payments", source_offset=-1),  # a review record
        letter(0, 3, carried=carried),  # at the cap
        letter(0, 4, topic="t.gone"),  # no such topic
        letter(0, 5),  # redriven
    ]
    ledger = {"0:1": {"action": "redriven"}}
    steps = plan(letters, Filters(kinds=frozenset({"transition", "saga"})), ledger, PARTS, 3)
    expected = [Action.FILTERED, Action.DONE, Action.REVIEW, Action.QUARANTINE,
                Action.UNSENDABLE, Action.REDRIVE]  # fmt: skip
    assert [s.action for s in steps] == expected
    assert steps[-1].partition == 1  # the source partition
    # One fewer redrive and the capped letter is redriven; a cap of 0 quarantines everything.
    assert plan([letters[3]], Filters(), {}, PARTS, 4)[0].action is Action.REDRIVE
    assert plan([letters[5]], Filters(), {}, PARTS, 0)[0].action is Action.QUARANTINE


def test_a_review_with_a_resume_goes_to_its_resume_topic_on_its_task_partition() -> None:
    """A saga given up in doubt: its review letter's value is the resume, sent to the resume
    topic (the letter's source is the payments table, offset -1). Capped like any letter."""
    resume = "t.paysaga.saga.resume"
    review = letter(0, 7, kind="saga", topic="payments", source_partition=2, source_offset=-1,
                    original=(), resume_topic=resume)  # fmt: skip
    assert (review.target, review.source.topic) == (resume, "payments")
    [step] = plan([review], Filters(), {}, {**PARTS, resume: 3})
    assert (step.action, step.partition) == (Action.REDRIVE, 2)
    [gone] = plan([review], Filters(), {}, PARTS)  # no resume topic: created by topics create
    assert gone.action is Action.UNSENDABLE
    capped = letter(0, 8, kind="saga", topic="payments", source_offset=-1, original=(),
                    resume_topic=resume, carried=((H_REDRIVE_COUNT, b"3"),))  # fmt: skip
    assert plan([capped], Filters(), {}, {resume: 3})[0].action is Action.QUARANTINE
    h = dict(redrive_headers(review, "t.payment.dlq"))
    assert h[H_REDRIVE_COUNT] == b"1" and h[H_ORIGIN_TOPIC] == b"payments"


def test_the_default_cap_is_three_redrives() -> None:
    actions = [
        plan([letter(carried=((H_REDRIVE_COUNT, str(n).encode()),))], Filters(), {}, PARTS)[0]
        for n in range(5)
    ]
    assert [s.action for s in actions] == [Action.REDRIVE] * 3 + [Action.QUARANTINE] * 2


def test_the_target_is_the_source_partition_or_the_partitioner() -> None:
    le = letter(source_partition=5, key=b"pay_9")
    assert target_partition(le, 8) == 5
    assert target_partition(le, 3) == partition_for(b"pay_9", 3)  # the topic shrank
    keyless = letter(source_partition=5, key=None)
    assert target_partition(keyless, 3) == 2


def test_a_redriven_record_carries_the_original_headers_and_where_it_comes_from() -> None:
    le = letter(2, 9, source_partition=1, source_offset=10, at=7_000)
    headers = redrive_headers(le, "t.payment.dlq")
    assert headers[0] == ("trace", b"t1")  # the input's own header, as it was
    h = parse_headers(headers)
    rid = derived_id("t.payment.dlq", "redrive", "2:9")
    assert h[H_REDRIVE_ID] == rid == redrive_id("t.payment.dlq", le)
    assert (h[H_REDRIVE_COUNT], h[H_REDRIVE_DLQ]) == ("1", "2:9")
    assert (h[H_ORIGIN_TOPIC], h[H_ORIGIN_PARTITION], h[H_ORIGIN_OFFSET]) == (SRC, "1", "10")
    assert h[H_ORIGIN_FIRST_FAILED_AT] == "7000"
    assert not any(k.startswith("paysaga.original.") or k == H_KIND for k, _ in headers)


def test_a_letter_redriven_before_keeps_its_origin_and_first_failure_and_counts_on() -> None:
    # It failed at t.first[0]@3 at 100, was redriven once, failed again on SRC[1]@10 at 900.
    carried = ((H_REDRIVE_ID, b"rid-1"), (H_REDRIVE_COUNT, b"1"), (H_REDRIVE_DLQ, b"0:0"),
               (H_ORIGIN_TOPIC, b"t.first"), (H_ORIGIN_PARTITION, b"0"),
               (H_ORIGIN_OFFSET, b"3"), (H_ORIGIN_FIRST_FAILED_AT, b"100"))  # fmt: skip
    le = letter(1, 4, at=900, carried=carried)
    assert le.redrive_count == 1 and le.first_failed_at == 100 and le.last_failed_at == 900
    assert (le.origin.topic, le.origin.partition, le.origin.offset) == ("t.first", 0, 3)
    h = parse_headers(redrive_headers(le, "t.payment.dlq"))
    assert h[H_REDRIVE_COUNT] == "2" and h[H_REDRIVE_DLQ] == "1:4"
    assert h[H_ORIGIN_TOPIC] == "t.first" and h[H_ORIGIN_FIRST_FAILED_AT] == "100"
    assert h[H_REDRIVE_ID] != "rid-1"  # a new letter, a new redrive id


def _ledger_record(key: bytes, value: bytes | None) -> ConsumerRecord:
    return ConsumerRecord("t.paysaga.dlq.redrives", 0, 0, 0, 0, key, value, None, 0, 0, ())


def test_the_ledger_keeps_the_latest_entry_and_a_tombstone_frees_a_letter() -> None:
    step = Step(letter(0, 1), Action.REDRIVE, 1)
    entry = ledger_entry(step, SRC, 1, "t.payment.dlq", 5)
    assert json.loads(entry)["redrive_id"] == redrive_id("t.payment.dlq", step.letter)
    ledger = ledger_of([
        _ledger_record(b"0:1", entry), _ledger_record(b"0:2", entry),
        _ledger_record(b"0:2", None), _ledger_record(b"0:3", b"not json"),
    ])  # fmt: skip
    assert set(ledger) == {"0:1", "0:3"}  # an unreadable entry still counts as done


def test_the_dry_run_report_counts_by_action_kind_and_topic() -> None:
    letters = [letter(0, 0), letter(0, 1), letter(0, 2, kind="decode"),
               letter(0, 3, carried=((H_REDRIVE_COUNT, b"3"),))]  # fmt: skip
    steps = plan(letters, Filters(), {"0:1": {}}, PARTS)
    out = io.StringIO()
    render_plan(steps, out)
    text = out.getvalue()
    assert "dry run: 4 dead letters, nothing sent" in text
    assert "would be: redriven 2, skipped (already done) 1, quarantined 1, filtered out 0" in text
    assert f"transition   {SRC}" in text and f"decode       {SRC}" in text


def test_the_summary_says_what_was_done_by_kind() -> None:
    outcome = Outcome()
    outcome.add("redriven", "decode", 3)
    outcome.add("quarantined", "decode")
    outcome.add("failed", "transition")
    out = io.StringIO()
    outcome.render(out)
    lines: list[Any] = out.getvalue().splitlines()
    assert lines[0].startswith("redrive: redriven 3, skipped (already done) 0, quarantined 1")
    assert lines[0].endswith("failed 1") and outcome.failed == 1
    assert "  decode: redriven 3, quarantined 1" in lines


def test_progress_is_a_rich_bar_or_plain_lines() -> None:
    from paysaga.streams.ops.redrive import PlainProgress, RichProgress, progress_for

    plain = io.StringIO()
    assert isinstance(progress_for(3, plain), PlainProgress)
    lines = PlainProgress(3, plain)
    lines.advance(1)
    lines.advance(2)
    lines.close()
    assert plain.getvalue().splitlines()[-1] == "redrive: 3/3 sent"
    bar = RichProgress(3, io.StringIO())
    bar.advance(3)
    bar.close()
    assert bar.bar.tasks[0].completed == 3
