"""`paysaga reset` end to end: a live history through the full saga with the simulators,
then resets of that application (docs/replay.md#reset).

- a reset refuses while a worker runs; `--dry-run` lists every action and changes nothing
  (end offsets, committed offsets, state files);
- after a worker's SIGKILL its member is still in the group: a reset refuses, `--force`
  removes it; that reset SIGKILLed half-way is finished by the next one, and the rebuilt
  payments table is identical, byte for byte, to the one it replaced; the reset wrote
  nothing but the changelogs; the restarted worker answers every payment as before, and
  new payments go through.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from paysaga.streams.app.kafka_io import read_all
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import Topics, changelog_topic, create_topics
from paysaga.streams.dev.upstream import UpstreamConfig, produce
from paysaga.streams.engine.journal import decode as decode_entry
from paysaga.streams.ops.replay import ReplayError, delete_group, live_table
from paysaga.streams.ops.reset import REBUILD_GROUP, plan_path
from paysaga.tables.payments import PAYMENTS
from tests.saga_support import CODEC, World, live_history, simulators, stop_all
from tests.support import (
    WorkerProcess,
    end_offsets,
    isolated_settings,
    paysaga,
    settings_env,
    topic_names,
    wait_for,
)

COUNT = 250


@pytest.fixture(scope="module")
def live(broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, Path]]:
    tmp: Path = tmp_path_factory.mktemp("reset")
    # A long session: a SIGKILLed worker stays a member while the test looks at it.
    settings = isolated_settings(broker.bootstrap, tmp / "state", "rs", command_timeout_ms=2000,
                                 punctuate_ms=200, session_timeout_ms=45_000)  # fmt: skip
    asyncio.run(create_topics(settings))
    live_history(settings, tmp, COUNT, seed=41)
    yield settings, tmp


def _ends(settings: Settings) -> dict[Any, int]:
    names = [t for t in asyncio.run(topic_names(settings.bootstrap))
             if t.startswith((settings.topic_prefix, f"{settings.app_id}-"))]  # fmt: skip
    return asyncio.run(end_offsets(settings.bootstrap, names))


def _records(settings: Settings, prefix: str) -> dict[str, int]:
    """Committed records per topic of `prefix` (what a read_committed reader sees)."""
    names = [t for t in asyncio.run(topic_names(settings.bootstrap)) if t.startswith(prefix)]
    return {t: len(asyncio.run(read_all(settings.bootstrap, t))) for t in names}


def _committed(settings: Settings, group: str) -> dict[Any, int]:
    async def go() -> dict[Any, int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
        await admin.start()
        try:
            return {tp: o.offset for tp, o in (await admin.list_consumer_group_offsets(
                group)).items()}  # fmt: skip
        finally:
            await admin.close()

    return asyncio.run(go())


def _groups(settings: Settings) -> list[str]:
    async def go() -> list[str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
        await admin.start()
        try:
            return [g for g, *_ in await admin.list_consumer_groups()]
        finally:
            await admin.close()

    return asyncio.run(go())


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _payments(settings: Settings) -> dict[bytes, bytes]:
    """The payments table as its changelog holds it now."""
    journal = Topics(settings.topic_prefix).journal
    stop = {p: 1 << 62 for p in range(settings.partitions)}  # past every entry: to the end
    return asyncio.run(live_table(settings, PAYMENTS, journal, stop))


def test_a_reset_refuses_while_a_worker_runs_and_a_dry_run_changes_nothing(live) -> None:
    settings, tmp = live
    worker = WorkerProcess(settings, tmp / "worker-running.log").start()
    try:
        refused = paysaga(settings, "reset")
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "active member" in refused.stderr and "Stop every worker" in refused.stderr
        with pytest.raises(ReplayError, match="it has members"):  # a running group stays
            _delete_group(settings, settings.app_id)
    finally:
        worker.stop()
    wait_for(lambda: not _members(settings), 60, what="the stopped worker leaving the group")
    ends, committed = _ends(settings), _committed(settings, settings.app_id)
    files = _files(settings.data_dir)
    dry = paysaga(settings, "reset", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    for table_log in (changelog_topic(settings, PAYMENTS),):
        assert f"would delete topic {table_log}" in dry.stdout, dry.stdout
    assert "would rebuild every table from journal" in dry.stdout
    assert "would delete the state directory" in dry.stdout
    assert (_ends(settings), _committed(settings, settings.app_id)) == (ends, committed)
    assert _files(settings.data_dir) == files, "the dry run changed local state"
    # From a second ago, no journal entry rebuilds the state there is: refused, unless
    # the operator says to start the state over (the dry run says what would be lost).
    later = paysaga(settings, "reset", "--by-duration", "PT1S")
    assert later.returncode == 2 and "--discard-earlier-state" in later.stderr, later.stderr
    assert "idempotency keys with it" in later.stderr
    dry_later = paysaga(settings, "reset", "--by-duration", "PT1S", "--discard-earlier-state",
                        "--dry-run")  # fmt: skip
    assert dry_later.returncode == 0, dry_later.stderr
    assert "would discard the state from before the position" in dry_later.stdout
    assert (_ends(settings), _committed(settings, settings.app_id)) == (ends, committed)
    assert _files(settings.data_dir) == files


def _delete_group(settings: Settings, group: str) -> None:
    async def go() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
        await admin.start()
        try:
            await delete_group(admin, group)
        finally:
            await admin.close()

    asyncio.run(go())


def _ticked_since(settings: Settings, since: dict[Any, int]) -> Callable[[], bool]:
    """A probe: every task committed a wall-clock punctuation (a journal entry that ran
    schedules) past the journal offsets `since`: the timers due at a worker's start ran."""
    journal = Topics(settings.topic_prefix).journal

    def probe() -> bool:
        ticked = {r.partition for r in asyncio.run(read_all(settings.bootstrap, journal))
                  if r.offset >= since.get((r.topic, r.partition), 0)
                  and decode_entry(r.value).ticked is not None}  # fmt: skip
        return len(ticked) == settings.partitions

    return probe


def _final(p: dict[str, Any]) -> bool:
    """A payment nothing will change any more (no timer, no settlement to come)."""
    return p["status"] in ("SETTLED", "FAILED", "CANCELED", "REVERSED") and not (
        p.get("outstanding") or p.get("doubts")
    )


def _initiated(settings: Settings) -> set[str]:
    topic = Topics(settings.topic_prefix).initiated
    return {CODEC.decode(r.value, "PaymentInitiated")["payment_id"]
            for r in asyncio.run(read_all(settings.bootstrap, topic))}  # fmt: skip


def _members(settings: Settings) -> list[tuple[str, str, str]]:
    from paysaga.streams.ops.reset import group_members

    async def go() -> list[tuple[str, str, str]]:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
        await admin.start()
        try:
            return await group_members(admin, settings.app_id)
        finally:
            await admin.close()

    return asyncio.run(go())


def test_a_forced_reset_killed_half_way_is_finished_and_reproduces_the_live_state(live) -> None:
    settings, tmp = live
    # A worker killed: its member stays in the group until its session times out.
    journal_ends = {(tp.topic, tp.partition): o for tp, o in _ends(settings).items()}
    crashed = WorkerProcess(settings, tmp / "worker-killed.log").start()
    wait_for(_ticked_since(settings, journal_ends), 60, what="the timers due at start run")
    crashed.kill()
    before = _payments(settings)  # as the killed worker left it (its timers ran)
    assert len(before) >= COUNT * 0.8
    assert _members(settings), "the killed worker's member should still be in the group"
    refused = paysaga(settings, "reset", "--verify")
    assert refused.returncode == 2 and "active member" in refused.stderr, refused.stderr
    records_before = _records(settings, settings.topic_prefix)

    proc = subprocess.Popen([sys.executable, "-m", "paysaga.streams.ops.cli", "reset", "--force",
                             "--verify"], env=settings_env(settings), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        wait_for(plan_path(settings).exists, 120, what="the reset saving its plan")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert not _members(settings), "--force should have removed the killed worker's member"

    done = paysaga(settings, "reset", "--verify", timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "finishing the reset interrupted" in done.stdout, done.stdout
    assert "verify: identical to the payments table it replaced" in done.stdout, done.stdout
    assert "records/s" in done.stdout
    assert not plan_path(settings).exists()
    assert _payments(settings) == before, "the rebuilt changelog is not the live table"
    assert not [
        g for g in _groups(settings) if g.startswith(REBUILD_GROUP.format(app=settings.app_id))
    ], "the rebuild's groups are left"
    # Nothing written but the changelogs: no command sent again, no status, no letter. The
    # committed records, not the end offsets: the reset's fencing aborts a transaction the
    # killed worker left open, and its abort markers move the ends of the live topics.
    after = _ends(settings)
    mine = settings.topic_prefix  # every topic but the changelogs (named by the app id)
    assert _records(settings, mine) == records_before
    assert any(tp.topic == changelog_topic(settings, PAYMENTS) for tp in after)

    # The restarted worker answers every payment as before, and goes on.
    sims = simulators(settings, tmp)
    worker = WorkerProcess(settings, tmp / "worker-after.log").start()
    try:
        settled = [(k, v) for k, v in before.items() if k[:1] != b"\x01" and _final(json.loads(v))]
        assert len(settled) >= 20, "too few payments at their end to compare"
        served = {}
        for key, _ in settled[:60]:  # served from the rebuilt state
            code, served[key] = worker.fetch(f"/payments/{key.decode()}")
            assert code == 200
        # As it was, or as the worker's own committed transactions changed it since (a
        # wall-clock schedule can still touch a settled payment after the restart).
        current = _payments(settings)
        moved = [k for k, body in served.items() if body != before[k]]
        assert all(served[k] == current[k] for k in moved), "served a value never committed"
        assert len(moved) <= len(served) // 4, f"{len(moved)} of {len(served)} not as rebuilt"
        world = World(settings)
        initiated = Topics(settings.topic_prefix).initiated
        known = _initiated(settings)
        cfg = UpstreamConfig(count=30, seed=77, duplicate_rate=0.0, conflict_rate=0.0,
                             manual_capture_rate=0.0, order_rate=0.0)  # fmt: skip
        asyncio.run(produce(settings.bootstrap, CODEC, cfg, rate=100, topic=initiated,
                            progress=False))  # fmt: skip
        new = _initiated(settings) - known
        assert len(new) == 30
        ended = lambda: new & {s["payment_id"] for s in world.statuses() if s["terminal"]}  # noqa: E731
        wait_for(lambda: len(ended()) >= 24, 120, what="new payments ending after the reset")
    finally:
        worker.stop()
        stop_all(sims)


def test_a_rebuild_that_meets_a_record_the_code_refuses_stops_and_says_which(
    live, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, _ = live
    wait_for(lambda: not _members(settings), 60, what="the stopped worker leaving the group")
    target = sorted(k for k in _payments(settings) if k[:1] != b"\x01")[0].decode()
    monkeypatch.setenv("TEST_REFUSE_PAYMENT", target)
    refusing = settings.model_copy(update={"topology": "tests.pipelines:refusing_saga_topology"})
    stopped = paysaga(refusing, "reset", "--verify", timeout=300)
    assert stopped.returncode == 2, stopped.stdout + stopped.stderr
    assert "the rebuild stopped" in stopped.stderr and "which the live run processed" in (
        stopped.stderr
    )
    assert f"this code refuses {target}" in stopped.stderr and "Traceback" not in stopped.stderr
    assert plan_path(settings).exists(), "a stopped rebuild keeps its plan"
    done = paysaga(settings, "reset", "--verify", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "finishing the reset interrupted" in done.stdout
    assert "verify: identical to the payments table it replaced" in done.stdout, done.stdout
