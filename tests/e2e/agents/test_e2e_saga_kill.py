"""Exactly-once of the whole saga, proven: thousands of payments through both sagas with the
simulated gateway, inventory and shipping, while the worker is SIGKILLed and restarted.

Afterwards, reading committed records only: every payment has exactly one terminal outcome;
no command id appears twice; per payment captured <= authorized and refunded <= captured;
no idempotency duplicate made a second payment; no output record was produced twice.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from paysaga.streams.app.kafka_io import read_all
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import Topics, create_topics
from paysaga.streams.dev.broker import LocalBroker
from paysaga.streams.dev.upstream import UpstreamConfig, produce
from tests.saga_support import CODEC, World, simulators
from tests.support import (
    WorkerProcess,
    isolated_settings,
    kill_repeatedly,
    wait_for,
)

#: Upstream requests per second, and an upper bound on how many (the load stops after the
#: last kill, at a few thousand).
RATE = 100
MAX_PAYMENTS = 20_000
KILLS = 5


class Upstream(threading.Thread):
    """Sends the upstream requests at `rate`/s until `stop()` (or the list is used up)."""

    def __init__(self, settings: Settings, cfg: UpstreamConfig, rate: float) -> None:
        super().__init__(daemon=True)
        self.settings, self.cfg, self.rate = settings, cfg, rate
        self.error: BaseException | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except asyncio.CancelledError:
            pass  # stopped: what was sent is read back from the topic
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    async def _main(self) -> None:
        topic = Topics(self.settings.topic_prefix).initiated
        run = produce(self.settings.bootstrap, CODEC, self.cfg, self.rate, topic, False)
        self._loop, self._task = asyncio.get_running_loop(), asyncio.ensure_future(run)
        self._started.set()
        await self._task

    def stop(self) -> None:
        """End the load; the producer flushes what it already accepted."""
        self._started.wait(30)
        if self._loop is not None and self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)


def _sent(settings: Settings) -> list[dict]:
    """The upstream requests that reached the input topic (committed, so all of them)."""
    records = asyncio.run(read_all(settings.bootstrap, Topics(settings.topic_prefix).initiated))
    return [CODEC.decode(r.value, "PaymentInitiated") for r in records]


@pytest.mark.slow
def test_full_sagas_survive_kill9(broker: LocalBroker, tmp_path: Path) -> None:
    # A shorter session: each restart waits that long for its killed self to leave the group.
    settings = isolated_settings(
        broker.bootstrap, tmp_path / "state", "sagakill",
        command_timeout_ms=3000, punctuate_ms=200, max_batch=200, session_timeout_ms=6000,
    )  # fmt: skip
    asyncio.run(create_topics(settings))
    world = World(settings)
    # Requests keep arriving until the last kill (the count only bounds the test): sagas that
    # all finished before it would leave nothing in flight to crash into.
    cfg = UpstreamConfig(count=MAX_PAYMENTS, seed=21, duplicate_rate=0.05, conflict_rate=0.01,
                         manual_capture_rate=0.0, order_rate=0.3)  # fmt: skip
    sims = simulators(settings, tmp_path)
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    upstream = Upstream(settings, cfg, rate=RATE)
    upstream.start()
    try:
        recovering = kill_repeatedly(worker, KILLS, lambda: len(world.statuses()), 400, upstream,
                                     random.Random(5), timeout=120)  # fmt: skip
        upstream.stop()
        upstream.join(60)
        assert upstream.error is None and not upstream.is_alive()
        requests = _sent(settings)
        scopes = _scopes(requests)
        wait_for(lambda: len(_terminal(world)) >= len(scopes), 300, what="every saga finished")
        settling = _to_settle(world)
        try:
            wait_for(lambda: _settled(world) >= set(settling), 120,
                     what="every completed payment settled")  # fmt: skip
            # A payment whose batch went out late may settle by the saga's retry first.
            wait_for(lambda: _members(world) >= set(settling), 60,
                     what="every completed payment in a submitted batch")  # fmt: skip
        except AssertionError as exc:
            raise AssertionError(f"{exc}; {_unsettled(world, settling)}") from None
    except AssertionError as exc:
        raise AssertionError(f"{exc}; {worker.diagnosis()}") from None
    finally:
        worker.stop()
        for p in sims:
            p.terminate()
            p.wait(10)
    _verify(world, requests, f"{KILLS} kills during batches and {recovering} during recovery")
    _verify_batches(world, settling)


def _to_settle(world: World) -> dict[str, int]:
    """Payment id -> amount, for every saga that completed with money captured."""
    final = {pid: found[0] for pid, found in _terminal(world).items()}
    return {pid: s["captured_minor"] for pid, s in final.items()
            if s["saga_state"] == "COMPLETED" and s["captured_minor"] > 0}  # fmt: skip


def _unsettled(world: World, settling: dict[str, int]) -> str:
    """What the payments that did not settle went through (for a failure message)."""
    missing = sorted(set(settling) - _settled(world))
    out = [f"{len(missing)} of {len(settling)} not settled"]
    for pid in missing[:3]:
        statuses = [(s["status"], s["reason"]) for s in world.statuses(pid)]
        settles = [(c["attempt"], c["_offset"]) for c in world.commands(pid)
                   if c["command_type"] == "SETTLE"]  # fmt: skip
        out.append(f"{pid}: statuses {statuses}; SETTLE commands {settles}")
    return "; ".join(out)


def _batches(world: World) -> list[dict]:
    records = asyncio.run(read_all(world.settings.bootstrap, world.t.settlement_batches))
    return [CODEC.decode(r.value, "SettlementBatch") for r in records]


def _members(world: World) -> set[str]:
    return {m["payment_id"] for b in _batches(world) for m in b["members"]}


def _settled(world: World) -> set[str]:
    return {s["payment_id"] for s in world.statuses() if s["status"] == "SETTLED"}


def _verify_batches(world: World, settling: dict[str, int]) -> None:
    """Each batch submitted once and adding up; each completed payment in exactly one
    batch, for what it captured; a SETTLE per member, of that batch's amount."""
    batches = _batches(world)
    assert [b for b, n in Counter(b["batch_id"] for b in batches).items() if n > 1] == []
    members: Counter[str] = Counter()
    for b in batches:
        assert b["member_count"] == len(b["members"]) > 0
        assert b["total_minor"] == sum(m["amount_minor"] for m in b["members"])
        for m in b["members"]:
            members[m["payment_id"]] += 1
            assert settling.get(m["payment_id"]) == m["amount_minor"], m
    assert [p for p, n in members.items() if n != 1] == []
    assert set(members) == set(settling)
    first_settles = [c for c in world.commands() if c["command_type"] == "SETTLE"
                     and c["attempt"] == 1]  # fmt: skip
    assert sorted(c["payment_id"] for c in first_settles) == sorted(settling)
    print(
        f"settlement: {len(batches)} batches, {len(members)} members, each once, totals "
        f"equal to their members' sums"
    )


def _scopes(requests: list[dict]) -> dict[tuple[str, str], set[str]]:
    """Idempotency scope -> the payment ids requested under it. Under each scope exactly
    one payment may exist: whichever request reached the scope's partition first (the
    original and a conflicting request carry different payment ids, so upstream put them
    on different partitions and either may win)."""
    scopes: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in requests:
        scopes[(r["merchant_id"], r["idempotency_key"])].add(r["payment_id"])
    return scopes


def _terminal(world: World) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for s in world.statuses():
        if s["terminal"]:
            out[s["payment_id"]].append(s)
    return out


def _verify(world: World, requests: list[dict], kills: str) -> None:
    scopes = _scopes(requests)
    statuses = world.statuses()
    # No output twice: every status record has its own deterministic event id.
    ids = Counter(s["event_id"] for s in statuses)
    twice = [(s["payment_id"], s["status"], s["replay"], s["reason"]) for s in statuses
             if ids[s["event_id"]] > 1]  # fmt: skip
    assert twice == []
    # Exactly one terminal outcome per payment, none for a conflicting request.
    terminal = _terminal(world)
    assert [p for p, found in terminal.items() if len(found) != 1] == []
    firsts, conflicting = set(), set()
    for scope, pids in scopes.items():
        winners = pids & set(terminal)
        assert len(winners) == 1, f"{scope}: payments {sorted(winners)} (exactly one expected)"
        firsts |= winners
        conflicting |= pids - winners
    for pid in conflicting:
        mine = [s for s in statuses if s["payment_id"] == pid]
        assert mine and {s["status"] for s in mine} == {"IDEMPOTENCY_CONFLICT"}
    # No command id twice; one payment per idempotency key (one AUTHORIZE key per payment).
    commands = world.commands()
    cmd_ids = Counter(c["command_id"] for c in commands)
    assert [i for i, n in cmd_ids.items() if n > 1] == []
    auth_keys: dict[str, set[str]] = defaultdict(set)
    for c in commands:
        assert c["payment_id"] in firsts, "a command for a payment that must not exist"
        if c["command_type"] == "AUTHORIZE":
            auth_keys[c["payment_id"]].add(c["idempotency_key"])
    assert all(len(keys) == 1 for keys in auth_keys.values())
    # Retries scheduled across the kills: none sent before its due time, by the records'
    # own timestamps (none lost: every saga finished, which a lost retry would prevent).
    sent = {c["command_id"]: c["_timestamp"] for c in commands}
    retries = world.retries()
    early = [r for r in retries if r["command_id"] in sent and sent[r["command_id"]] < r["due_at"]]
    assert early == []
    print(
        f"retries: {len(retries)} scheduled, {sum(r['command_id'] in sent for r in retries)} "
        f"sent, none early"
    )
    # Money, from the gateway's committed answers (deduplicated by event id).
    money = _gateway_money(world)
    for pid, m in money.items():
        assert m["CAPTURED"] <= m["AUTHORIZED"], pid
        assert m["REFUND"] <= m["CAPTURED"], pid
    final = {pid: found[0] for pid, found in terminal.items()}
    for s in final.values():
        assert s["captured_minor"] <= s["authorized_minor"] <= s["amount_minor"]
        assert s["refunded_minor"] <= s["captured_minor"]
    outcomes = Counter(s["saga_state"] for s in final.values())
    replays = sum(s["replay"] for s in statuses)
    print(f"\nsaga kill -9 test: {len(requests)} requests, {len(firsts)} payments, "
          f"{len(conflicting)} conflicts, {replays} replays, {kills}; outcomes "
          f"{dict(outcomes)}; {len(commands)} commands, 0 duplicate command ids, "
          f"0 duplicate status ids, 0 payments with != 1 terminal outcome")  # fmt: skip


def _gateway_money(world: World) -> dict[str, Counter]:
    t = world.t
    schemas = {t.authorized: "PaymentAuthorized", t.captured: "PaymentCaptured",
               t.reversed: "PaymentReversed"}  # fmt: skip
    seen: set[str] = set()
    money: dict[str, Counter] = defaultdict(Counter)
    for topic, schema in schemas.items():
        for r in asyncio.run(read_all(world.settings.bootstrap, topic)):
            e = CODEC.decode(r.value, schema)
            if e["event_id"] in seen:
                continue  # the gateway re-sends its stored answer for a retried command
            seen.add(e["event_id"])
            kind = e.get("kind") or schema.removeprefix("Payment").upper()
            money[e["payment_id"]][kind] += e["amount_minor"]
    return money
