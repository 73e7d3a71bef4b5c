"""The journal's record of a transaction, and the replay command's parsing and digest.

What a journal entry must keep to re-execute its transaction: each input partition's
range, the exact merge order across partitions (ties by timestamp included), the clock,
the poison applied, a punctuation's schedules and where each table's changelog stood.
"""

from __future__ import annotations

import pytest
from aiokafka.structs import ConsumerRecord

from paysaga.streams.app.settings import Settings
from paysaga.streams.engine.journal import JournalError, decode, encode
from paysaga.streams.ops.replay import (
    ReplayError,
    differences,
    digest,
    parse_duration,
    parse_positions,
    rename_map,
    replay_settings,
)


def rec(topic: str, partition: int, offset: int, ts: int = 0) -> ConsumerRecord:
    return ConsumerRecord(topic, partition, offset, ts, 0, None, b"v", None, 0, 1, ())


def test_an_entry_keeps_ranges_merge_order_clock_poison_and_positions() -> None:
    records = [rec("a", 0, 5), rec("b", 0, 9), rec("b", 0, 10), rec("a", 0, 6), rec("a", 0, 8)]
    poison = {("b", 0, 10): ("poison", "agent raised", 1), ("z", 0, 1): ("x", "y", 2)}
    entry = decode(encode(1_700, 42, records, poison, None, {"payments": 77}))
    assert entry.now == 1_700 and entry.stream_time == 42 and entry.ticked is None
    # Offsets 7 of "a" held no committed record live (a marker): the range spans it.
    assert entry.inputs == (("a", 0, 5, 8), ("b", 0, 9, 10))
    assert entry.order == ((0, 1), (1, 2), (0, 2))
    assert entry.poison == (("b", 0, 10, "poison", "agent raised"),)
    assert dict(entry.changelog) == {"payments": 77}


def test_an_entry_keeps_the_inputs_a_decoder_refused_and_an_old_one_says_it_did_not() -> None:
    records = [rec("a", 0, 5), rec("a", 0, 6)]
    entry = decode(encode(1, 1, records, {}, None, None, [("a", 0, 6), ("a", 0, 6)]))
    assert entry.decoded == (("a", 0, 6),)  # once, though two agents refused it
    assert decode(encode(1, 1, records, {}, None)).decoded == ()  # none: a fact too
    old = b'{"v":1,"w":1,"st":1,"in":[["a",0,5,6]],"o":[[0,2]]}'
    assert decode(old).decoded is None  # written before the journal kept them


def test_a_punctuation_entry_names_its_schedules_and_reads_nothing() -> None:
    entry = decode(encode(5, -1, [], {}, ["breaker"], None))
    assert entry.ticked == ("breaker",) and entry.inputs == () and entry.records == 0
    one = decode(encode(5, 3, [rec("a", 1, 3), rec("a", 1, 4)], {}, None))
    assert one.order == ((0, 2),) and one.records == 2
    # One partition across a transaction marker: two records in a span of three offsets.
    gap = decode(encode(5, 3, [rec("a", 1, 60), rec("a", 1, 62)], {}, None))
    assert gap.inputs == (("a", 1, 60, 62),) and gap.records == 2


def test_what_is_not_a_journal_entry_is_refused_with_a_reason() -> None:
    for raw in (b"", b"{}", b'{"v": 99, "w": 1, "st": 1}', b'{"v": 1}', b"[1]"):
        with pytest.raises(JournalError):
            decode(raw)


def test_durations_and_positions_are_read_strictly() -> None:
    assert parse_duration("P1D") == 86_400_000
    assert parse_duration("PT6H") == 6 * 3_600_000
    assert parse_duration("P1DT30M5S") == 86_400_000 + 30 * 60_000 + 5_000
    for bad in ("P", "PT", "1D", "one day", "P1W", "-P1D"):
        with pytest.raises(ReplayError):
            parse_duration(bad)
    live = Settings(topic_prefix="live.")
    got = parse_positions("payment.initiated:0:12, live.payment.requests:2:0", live)
    assert [(p.topic, p.partition, p.offset) for p in got] == [
        ("live.payment.initiated", 0, 12), ("live.payment.requests", 2, 0)]  # fmt: skip
    for bad in ("", "payment.initiated:0", "payment.initiated:x:1", "t:0:-1"):
        with pytest.raises(ReplayError):
            parse_positions(bad, live)


def test_a_replay_is_isolated_under_its_own_names() -> None:
    live = Settings(topic_prefix="live.", app_id="paysaga")
    mine = replay_settings(live, "r1")
    assert mine.app_id == "paysaga.replay.r1" and mine.topic_prefix == "live.replay.r1."
    assert mine.input_topic_prefix == "live."
    renamed = rename_map(live, mine)
    assert renamed["live.paysaga.payment.accepted"] == "live.replay.r1.paysaga.payment.accepted"
    assert all(k.startswith("live.") and v.startswith("live.replay.r1.")
               for k, v in renamed.items())  # fmt: skip
    assert "live.payment.initiated" not in renamed  # inputs keep the live name
    for bad in ("", "a b", "../x", "x" * 65):
        with pytest.raises(ReplayError):
            replay_settings(live, bad)


def test_the_digest_is_of_keys_and_values_and_differences_name_both() -> None:
    a = {b"k1": b"v1", b"k2": b"v2"}
    assert digest(a).sha256 == digest(dict(reversed(a.items()))).sha256
    assert digest(a).sha256 != digest({b"k1": b"v1", b"k2": b"v3"}).sha256
    assert digest({b"k": b"1v"}).sha256 != digest({b"k1": b"v"}).sha256  # framed, not joined
    diff = differences(a, {b"k1": b"v1", b"k3": b"x"})
    assert diff == ["k2: replayed v2 | live <absent>", "k3: replayed <absent> | live x"]
