"""`paysaga dlq redrive` against the real broker, as an operator runs it (subprocesses).

A worker dead-letters bad input with every header; a letter redriven after its fix is
applied once, however often it is redriven or its record delivered; a still-bad record
comes back with its history until it is quarantined; a dry run sends nothing; a redrive
killed with SIGKILL and run again sends every letter exactly once in total (the ledger).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Any

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from paysaga.domain.payment import derived_id
from paysaga.streams.app.kafka_io import consumer, partitions, read_all
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import Topics, topic_specs
from paysaga.streams.engine.deadletter import (
    H_ATTEMPTS,
    H_ERROR_CLASS,
    H_FAILED_AT,
    H_FIRST_FAILED_AT,
    H_KIND,
    H_LAST_FAILED_AT,
    H_OFFSET,
    H_ORIGIN_FIRST_FAILED_AT,
    H_ORIGIN_OFFSET,
    H_ORIGIN_PARTITION,
    H_ORIGIN_TOPIC,
    H_PARTITION,
    H_REASON,
    H_REDRIVE_COUNT,
    H_REDRIVE_DLQ,
    H_REDRIVE_ID,
    H_TOPIC,
    DeadLetter,
    original_headers,
    parse_headers,
)
from paysaga.streams.engine.partitioner import partition_for
from paysaga.streams.ops.redrive import H_QUARANTINE_DLQ
from tests.saga_support import World, new_id
from tests.samples import initiated
from tests.support import paysaga, produce, redrive, settings_env, wait_for

BAD = b"\xff\x00 not avro at all"
MINE = [("trace-id", b"abc"), ("hop", b"1"), ("hop", b"2")]


def letters(settings: Settings) -> list[ConsumerRecord]:
    return asyncio.run(read_all(settings.bootstrap, Topics(settings.topic_prefix).dlq))


def wait_letters(settings: Settings, n: int, what: str) -> list[ConsumerRecord]:
    return wait_for(lambda: (d := letters(settings)) and len(d) >= n and d, 60, what=what)


def ledger(settings: Settings) -> list[ConsumerRecord]:
    return asyncio.run(read_all(settings.bootstrap, Topics(settings.topic_prefix).dlq_redrives))


def end_offsets(settings: Settings) -> dict[TopicPartition, int]:
    """High watermarks of every topic (read_uncommitted: aborted writes count too)."""

    async def go() -> dict[TopicPartition, int]:
        c = consumer(settings.bootstrap, "read_uncommitted")
        await c.start()
        try:
            tps = [tp for s in topic_specs(settings) for tp in await partitions(c, s.name)]
            return dict(await c.end_offsets(tps))
        finally:
            await c.stop()

    return asyncio.run(go())


def test_a_bad_record_has_every_header_and_comes_back_until_quarantined(
    worker_factory, topics: Settings
) -> None:
    worker_factory().start()
    t = Topics(topics.topic_prefix)
    sent = produce(topics, t.initiated, [(b"bad", BAD, MINE, 1)])[0]
    before = int(time.time() * 1000)

    first = wait_letters(topics, 1, "the first dead letter")[0]
    h = parse_headers(first.headers)
    assert (first.key, first.value) == (b"bad", BAD)  # the original bytes
    assert h[H_KIND] == "decode" and h[H_REASON] and h[H_ERROR_CLASS] == "permanent"
    assert (h[H_TOPIC], h[H_PARTITION], h[H_OFFSET]) == (t.initiated, "1", str(sent.offset))
    assert h[H_ATTEMPTS] == "1"
    assert h[H_FIRST_FAILED_AT] == h[H_LAST_FAILED_AT] == h[H_FAILED_AT]
    assert abs(int(h[H_LAST_FAILED_AT]) - before) < 60_000
    assert original_headers(first.headers) == MINE  # in order, repeated names kept
    assert not any(k.startswith("paysaga.redrive.") for k in h)

    ref1 = f"{first.partition}:{first.offset}"
    listing = paysaga(topics, "dlq", "list")
    assert f"{ref1}  decode     permanent" in listing.stdout and "redrives=0" in listing.stdout
    shown = paysaga(topics, "dlq", "show", ref1)
    assert "paysaga.original.trace-id: 3 bytes (original header, not printed)" in shown.stdout
    assert "abc" not in shown.stdout and "not avro" not in shown.stdout
    assert f"{H_FIRST_FAILED_AT}: {h[H_FIRST_FAILED_AT]} (20" in shown.stdout  # and in UTC
    assert "paysaga.redrive.count: 0 (never redriven)" in shown.stdout

    # Still bad: each redrive brings it back with one more redrive, the same first failure
    # and the same origin, until the cap quarantines it instead.
    previous = first
    for n in (1, 2):
        run = redrive(topics, "--max-redrives", "2")
        assert run.returncode == 0, run.stdout + run.stderr
        assert f"redriven 1, skipped (already done) {n - 1}, quarantined 0" in run.stdout
        again = wait_letters(topics, n + 1, f"dead letter #{n + 1}")[n]
        g = parse_headers(again.headers)
        assert (again.key, again.value) == (b"bad", BAD)
        assert g[H_REDRIVE_COUNT] == str(n)
        prev_ref = f"{previous.partition}:{previous.offset}"
        assert g[H_REDRIVE_DLQ] == prev_ref
        assert g[H_REDRIVE_ID] == derived_id(t.dlq, "redrive", prev_ref)
        assert (g[H_ORIGIN_TOPIC], g[H_ORIGIN_PARTITION], g[H_ORIGIN_OFFSET]) == (
            t.initiated, "1", str(sent.offset))  # fmt: skip
        assert g[H_FIRST_FAILED_AT] == g[H_ORIGIN_FIRST_FAILED_AT] == h[H_FIRST_FAILED_AT]
        assert int(g[H_LAST_FAILED_AT]) >= int(h[H_LAST_FAILED_AT])
        assert (g[H_TOPIC], g[H_PARTITION]) == (t.initiated, "1")  # its source partition
        assert int(g[H_OFFSET]) > sent.offset
        assert original_headers(again.headers) == MINE  # not doubled by the round trips
        previous = again

    capped = redrive(topics, "--max-redrives", "2")
    assert capped.returncode == 0, capped.stdout + capped.stderr
    assert "redriven 0, skipped (already done) 2, quarantined 1" in capped.stdout
    quarantined = asyncio.run(read_all(topics.bootstrap, t.dlq_quarantine))
    assert len(quarantined) == 1 and quarantined[0].value == BAD
    q = parse_headers(quarantined[0].headers)
    assert q[H_QUARANTINE_DLQ] == f"{previous.partition}:{previous.offset}"
    assert q[H_REDRIVE_COUNT] == "2" and original_headers(quarantined[0].headers) == MINE
    assert len(ledger(topics)) == 3

    # Quarantined once: a later run neither quarantines nor redrives it again.
    later = redrive(topics, "--max-redrives", "2")
    assert "redriven 0, skipped (already done) 3, quarantined 0" in later.stdout
    assert len(asyncio.run(read_all(topics.bootstrap, t.dlq_quarantine))) == 1
    assert len(letters(topics)) == 3


def _on_partition(partition: int, parts: int) -> str:
    """A fresh payment id whose key lands on `partition`."""
    while True:
        pid = "pay_" + new_id()
        if partition_for(pid.encode(), parts) == partition:
            return pid


def test_a_letter_redriven_after_the_fix_is_applied_once(worker_factory, topics: Settings) -> None:
    worker = worker_factory().start()
    world = World(topics)
    t = world.t
    p = initiated(1, seed=515, saga="PAYMENT", items=[], capture_mode="MANUAL")[0]
    pid = p["payment_id"]
    # The capture request arrives before its payment: no payment, a transition letter.
    req = world.request(p, "CAPTURE", "cap-1", p["amount_minor"])
    wait_letters(topics, 1, "the early capture dead-lettered")
    [(key, h)] = world.dead_letters()
    assert key == pid.encode() and h[H_KIND] == "transition"
    assert h[H_REASON] == f"no payment {pid} for this event" and h[H_TOPIC] == t.requests

    world.initiate(p)  # the fix: the payment now exists, authorized, awaiting capture
    world.answer(world.wait_command(pid, "AUTHORIZE"), "AUTHORIZED")
    world.wait_status(pid, "authorized", lambda s: s["status"] == "AUTHORIZED")
    assert not [c for c in world.commands(pid) if c["command_type"] == "CAPTURE"]

    dry = redrive(topics, "--dry-run", "--kind", "transition")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "dry run: 1 dead letters, nothing sent" in dry.stdout
    assert "would be: redriven 1, skipped (already done) 0, quarantined 0" in dry.stdout
    assert f"transition   {t.requests}" in dry.stdout
    assert not ledger(topics)

    run = redrive(topics, "--kind", "transition")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "redriven 1, skipped (already done) 0" in run.stdout
    assert "  transition: redriven 1" in run.stdout
    cap = world.wait_command(pid, "CAPTURE")
    assert cap["amount_minor"] == p["amount_minor"]

    # Run again: the ledger says it is done, nothing is sent.
    ends = end_offsets(topics)
    again = redrive(topics, "--kind", "transition")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "redriven 0, skipped (already done) 1" in again.stdout
    after = end_offsets(topics)
    assert {tp: n for tp, n in after.items() if tp.topic in (t.requests, t.dlq_redrives)} == {
        tp: n for tp, n in ends.items() if tp.topic in (t.requests, t.dlq_redrives)
    }

    # The same letter redriven through another ledger would deliver it again: the saga
    # applies it once (dedup by event_id). Two more copies of the redriven record, then a
    # marker on the same partition whose dead letter says the copies were processed.
    copies = [r for r in asyncio.run(read_all(topics.bootstrap, t.requests))
              if H_REDRIVE_ID in dict(r.headers)]  # fmt: skip
    assert len(copies) == 1
    c = copies[0]
    produce(topics, t.requests, [(c.key, c.value, list(c.headers), c.partition)] * 2)
    marker = {**p, "payment_id": _on_partition(c.partition, topics.partitions)}
    world.request(marker, "CAPTURE", "cap-marker", p["amount_minor"])
    wait_for(lambda: any(k == marker["payment_id"].encode() for k, _ in world.dead_letters()),
             60, what=f"the marker processed after the copies ({worker.log})")  # fmt: skip

    caused = [s for s in world.statuses(pid) if s["causation_id"] == req["event_id"]]
    assert len(caused) == 1
    assert [x["command_type"] for x in world.commands(pid)].count("CAPTURE") == 1


def _letters_for(settings: Settings, n: int) -> list[tuple[Any, ...]]:
    """`n` dead letters as a worker writes them (decode failures on payment.initiated)."""
    t = Topics(settings.topic_prefix)
    items = []
    for i in range(n):
        mine = (("n", str(i).encode()),)
        dl = DeadLetter("decode", "not avro", t.initiated, i % 3, 1000 + i, input_headers=mine)
        items.append((f"k{i}".encode(), b"bad %d" % i, dl.headers(), i % 3))
    return items


def test_a_dry_run_sends_nothing_and_says_what_it_would_do(topics: Settings) -> None:
    t = Topics(topics.topic_prefix)
    produce(topics, t.dlq, _letters_for(topics, 6))
    review = DeadLetter("saga", "in doubt", "payments", 0, -1).headers()
    produce(topics, t.dlq, [(b"pay_x", b"{}", review, 0)])
    ends = end_offsets(topics)

    dry = redrive(topics, "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "dry run: 7 dead letters, nothing sent" in dry.stdout
    assert "would be: redriven 6, skipped (already done) 0, quarantined 0, filtered out 0, " \
           "not redrivable (review) 1" in dry.stdout  # fmt: skip
    assert f"redriven                 decode       {t.initiated}" in dry.stdout
    narrow = redrive(topics, "--dry-run", "--offsets", "0:0-0,1:0-", "--error-class", "permanent")
    assert "would be: redriven 3, skipped (already done) 0, quarantined 0, filtered out 4" \
        in narrow.stdout  # fmt: skip
    bad = redrive(topics, "--dry-run", "--offsets", "0:9-1")
    assert bad.returncode == 2 and "--offsets" in bad.stderr
    assert end_offsets(topics) == ends  # not a record written anywhere

    # A letter whose source topic is gone cannot be sent: said, and a failing exit status.
    gone = DeadLetter("decode", "r", topics.topic_prefix + "no.such.topic", 0, 5).headers()
    produce(topics, t.dlq, [(b"k", b"v", gone, 2)])
    run = redrive(topics, "--source-topic", topics.topic_prefix + "no.such.topic")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "redriven 0" in run.stdout and run.stdout.splitlines()[0].endswith("failed 1")
    assert "cannot send 2:" in run.stderr and not ledger(topics)


def test_a_killed_redrive_resumes_and_sends_every_letter_exactly_once(topics: Settings) -> None:
    t = Topics(topics.topic_prefix)
    n = 60
    produce(topics, t.dlq, _letters_for(topics, n))
    dlq = letters(topics)
    ids = {derived_id(t.dlq, "redrive", f"{r.partition}:{r.offset}") for r in dlq}
    assert len(ids) == n

    slow = subprocess.Popen(
        [sys.executable, "-m", "paysaga.streams.ops.cli", "dlq", "redrive", "--rate", "10",
         "--batch", "4"],
        env=settings_env(topics), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(lambda: len(ledger(topics)) >= 12, 60, what="a dozen letters redriven")
    finally:
        os.killpg(slow.pid, signal.SIGKILL)  # mid-run: a transaction may be open
        slow.wait()
    done_before = len(ledger(topics))
    assert done_before < n, "the slow redrive finished before it was killed"

    rerun = redrive(topics, "--rate", "0")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"redriven {n - done_before}, skipped (already done) {done_before}" in rerun.stdout
    assert len(ledger(topics)) == n

    sent = asyncio.run(read_all(topics.bootstrap, t.initiated))
    per_id = Counter(dict(r.headers).get(H_REDRIVE_ID, b"").decode() for r in sent)
    assert per_id == Counter(dict.fromkeys(ids, 1))  # every letter once, nothing else
    for r in sent:
        h = parse_headers(r.headers)
        i = int(h["n"])  # the original header, back as it was
        assert (r.key, r.value, r.partition) == (f"k{i}".encode(), b"bad %d" % i, i % 3)
        assert h[H_REDRIVE_COUNT] == "1" and h[H_ORIGIN_OFFSET] == str(1000 + i)

    final = redrive(topics, "--rate", "0")
    assert f"redriven 0, skipped (already done) {n}" in final.stdout


def test_a_second_redrive_fences_the_first_and_nothing_is_sent_twice(topics: Settings) -> None:
    t = Topics(topics.topic_prefix)
    n = 40
    produce(topics, t.dlq, _letters_for(topics, n))
    first = subprocess.Popen(
        [sys.executable, "-m", "paysaga.streams.ops.cli", "dlq", "redrive", "--rate", "5",
         "--batch", "2"],
        env=settings_env(topics), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(lambda: len(ledger(topics)) >= 4, 60, what="the first redrive under way")
        second = redrive(topics, "--rate", "0")  # takes the transactional id over
        out, _ = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert second.returncode == 0, second.stdout + second.stderr
    assert first.returncode == 1 and "fenced" in out, out
    assert len(ledger(topics)) == n
    sent = asyncio.run(read_all(topics.bootstrap, t.initiated))
    per_id = Counter(dict(r.headers)[H_REDRIVE_ID] for r in sent)
    assert len(per_id) == n and set(per_id.values()) == {1}
