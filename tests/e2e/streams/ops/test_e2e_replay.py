"""`paysaga replay` end to end: payments live through the full saga with the simulated
gateway, inventory and shipping (timeouts, retries and declines included), then replays of
that history into isolated applications.

- a full replay from the start gives a payments table identical to the live one, byte for
  byte (`--verify`), and writes nothing to any live topic (so no simulator sees a
  replayed command);
- a replay SIGKILLed half-way is refused as existing, then finished with `--resume`, with
  the same identical table;
- positions that do not exist are refused with the partition named, before anything is
  written; `replay cleanup` deletes a replay's topics, group and state.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from paysaga.domain.payment import Payment
from paysaga.streams.app.kafka_io import read_all
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import Topics, create_topics
from paysaga.streams.ops.api_models import PaymentResource
from paysaga.streams.ops.replay import live_table, replay_settings
from paysaga.tables.payments import PAYMENTS as PAYMENTS_TABLE
from tests.saga_support import CODEC, live_history
from tests.support import (
    end_offsets,
    isolated_settings,
    paysaga,
    settings_env,
    topic_names,
    wait_for,
)

PAYMENTS = 600


@pytest.fixture(scope="module")
def live(broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A live history: PAYMENTS payments through every saga path, then everything stopped,
    so the live topics stand still while the replays run."""
    tmp: Path = tmp_path_factory.mktemp("replay")
    settings = isolated_settings(broker.bootstrap, tmp / "state", "rp", command_timeout_ms=2000,
                                 punctuate_ms=200)  # fmt: skip
    asyncio.run(create_topics(settings))
    live_history(settings, tmp, PAYMENTS, seed=33)
    yield settings


def _live_ends(settings: Settings) -> dict[Any, int]:
    mine = [t for t in asyncio.run(topic_names(settings.bootstrap))
            if t.startswith(settings.topic_prefix) and ".replay." not in t
            and not t.startswith(f"{settings.topic_prefix}replay.")]  # fmt: skip
    mine += [
        t
        for t in asyncio.run(topic_names(settings.bootstrap))
        if t.startswith(f"{settings.app_id}-")
    ]  # the live changelogs
    return asyncio.run(end_offsets(settings.bootstrap, mine))


def test_a_full_replay_reproduces_the_live_table_and_writes_nothing_live(live: Settings) -> None:
    before = _live_ends(live)
    done = paysaga(live, "replay", "full", "--verify", timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verify: identical payments table" in done.stdout, done.stdout
    assert "records/s" in done.stdout
    assert _live_ends(live) == before, "the replay wrote to a live topic"
    # Its commands stayed on its own topics, where no service reads them.
    replayed = replay_settings(live, "full")
    commands = Topics(replayed.topic_prefix).commands
    assert asyncio.run(end_offsets(live.bootstrap, [commands]))
    again = paysaga(live, "replay", "full")
    assert again.returncode == 2 and "exists" in again.stderr
    # The replayed state is queryable like the live one: as the API shows a payment.
    table = asyncio.run(live_table(live, PAYMENTS_TABLE, Topics(live.topic_prefix).journal,
                                   {p: 1 << 62 for p in range(live.partitions)}))  # fmt: skip
    pid, raw = next((k.decode(), v) for k, v in sorted(table.items()) if k[:1] != b"\x01")
    shown = paysaga(live, "payment", "show", pid, "--app", "full")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == PaymentResource.of(Payment.from_json(raw)).model_dump(
        mode="json"
    )
    trail = paysaga(live, "payment", "history", pid, "--app", "full")
    assert trail.returncode == 0 and f"{replayed.topic_prefix}payment.commands" in trail.stdout, (
        trail.stdout + trail.stderr
    )
    missing = paysaga(live, "payment", "show", "pay_nobody", "--app", "full")
    assert missing.returncode == 1 and "no payment pay_nobody in replay full" in missing.stderr
    unknown = paysaga(live, "payment", "show", pid, "--app", "nosuch")
    assert unknown.returncode == 2 and "no replay nosuch" in unknown.stderr

    cleaned = paysaga(live, "replay", "cleanup", "full")
    assert cleaned.returncode == 0, cleaned.stderr
    left = [
        t for t in asyncio.run(topic_names(live.bootstrap)) if t.startswith(replayed.topic_prefix)
    ]
    assert left == [] and not (replayed.data_dir / replayed.app_id).exists()


def test_a_replay_killed_half_way_resumes_to_the_same_table(live: Settings) -> None:
    env = settings_env(live)
    proc = subprocess.Popen([sys.executable, "-m", "paysaga.streams.ops.cli", "replay", "kill",
                             "--verify"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    mine = replay_settings(live, "kill")

    async def committed() -> int:
        admin = AIOKafkaAdminClient(bootstrap_servers=live.bootstrap)
        await admin.start()
        try:
            return sum(o.offset for o in (await admin.list_consumer_group_offsets(
                mine.app_id)).values())  # fmt: skip
        finally:
            await admin.close()

    try:
        wait_for(lambda: asyncio.run(committed()) > 0, 120, what="the replay committing")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    at_kill = asyncio.run(committed())
    plan = json.loads((mine.data_dir / mine.app_id / "replay-plan.json").read_text())
    assert at_kill < sum(plan["stop"].values()), "the kill came after the replay's end"
    refused = paysaga(live, "replay", "kill", "--verify")
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = paysaga(live, "replay", "kill", "--verify", "--resume", timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "verify: identical payments table" in resumed.stdout, resumed.stdout


def test_positions_that_do_not_exist_are_refused_before_anything_is_written(
    live: Settings,
) -> None:
    t = Topics(live.topic_prefix)
    past = paysaga(live, "replay", "bad", "--from-offsets", f"{t.initiated}:0:999999")
    assert past.returncode == 2 and f"{t.initiated}[0]" in past.stderr and "past" in past.stderr
    nowhere = paysaga(live, "replay", "bad", "--from-offsets", "payment.initiated:7:0")
    assert nowhere.returncode == 2 and "[7]" in nowhere.stderr
    duration = paysaga(live, "replay", "bad", "--from-duration", "one day")
    assert duration.returncode == 2 and "ISO 8601" in duration.stderr
    mine = replay_settings(live, "bad")
    assert not [
        x for x in asyncio.run(topic_names(live.bootstrap)) if x.startswith(mine.topic_prefix)
    ]
    recent = paysaga(live, "replay", "recent", "--from-duration", "PT1H", timeout=600)
    assert recent.returncode == 0, recent.stdout + recent.stderr


def _by_payment(settings: Settings, topic: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in asyncio.run(read_all(settings.bootstrap, topic)):
        s = CODEC.decode(r.value, "PaymentStatusChanged")
        out.setdefault(s["payment_id"], []).append(s)
    return out


def test_a_replay_from_mid_stream_reproduces_exactly_the_suffix(live: Settings) -> None:
    """From the middle of the journal (by time), up to a time before its end: every saga
    that started inside that stretch has exactly the live status records (by id, field for
    field), and the replay has none of the earlier or later starts."""
    journal = asyncio.run(read_all(live.bootstrap, Topics(live.topic_prefix).journal))
    times = sorted(json.loads(r.value)["w"] for r in journal)
    since, until = times[len(times) // 3], times[2 * len(times) // 3]
    done = paysaga(live, "replay", "mid", "--from-time", str(since), "--to-time", str(until),
                   timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    mine = replay_settings(live, "mid")
    replayed = _by_payment(live, Topics(mine.topic_prefix).status)
    recorded = _by_payment(live, Topics(live.topic_prefix).status)
    started = [pid for pid, ss in replayed.items()
               if any(s["previous_status"] is None and not s["replay"] for s in ss)]  # fmt: skip
    assert 0 < len(started) < len(recorded)
    for pid in started:
        ids = {s["event_id"] for s in replayed[pid]}
        live_same = [s for s in recorded[pid] if s["event_id"] in ids]
        assert sorted(replayed[pid], key=lambda s: s["event_id"]) == sorted(
            live_same, key=lambda s: s["event_id"]), pid  # fmt: skip
    # Sagas that started before the stretch are not started again in it.
    early = [pid for pid, ss in recorded.items() if pid not in replayed]
    assert early
