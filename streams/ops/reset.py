"""`paysaga reset`: rebuild the live application's state from its recorded history
(docs/replay.md#reset).

Like kafka-streams-application-reset, a reset refuses while the group has members
(`--force` removes them), deletes the application's changelogs and its local state
directory, and starts over from a chosen position (earliest, offsets, a datetime or a
duration ago); `--dry-run` prints every action and changes nothing.

Unlike it, the reprocessing happens here, once, from the journal: every recorded
transaction from the position on is re-executed with the live application's own ids, on
the records it names and with the clock the live batch read, and it writes its changelog
records and nothing else. Re-reading the input topics instead would read the services'
recorded answers before the requests that caused them, decide timeouts by today's clock,
and send every command to the gateway again, whose idempotency keys have long expired:
a payment team's reset must never charge anyone. The live group's input offsets are
left where the live run stopped, so the restarted worker goes on from there, on state
rebuilt exactly as the recorded history made it (`--verify` compares it, byte for byte,
with the state it replaced).

A reset interrupted (a SIGKILL, a broker outage) leaves its plan in the data directory;
the next `paysaga reset` finishes that one, from the same plan and against the same
expected digest, whatever positions it is given.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.protocol.admin import DescribeGroupsRequest
from aiokafka.protocol.group import LeaveGroupRequest
from aiokafka.structs import TopicPartition

from paysaga.streams.app.kafka_io import consumer, partitions
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import create_topics, internal_specs
from paysaga.streams.engine.config import ReplaySource
from paysaga.streams.ops.inspection import utc
from paysaga.streams.ops.replay import (
    Plan,
    ReplayError,
    delete_group,
    differences,
    digest,
    first_entry,
    live_table,
    make_plan,
    progress_display,
    run_to_end,
    state_dir,
)
from paysaga.tables.payments import PAYMENTS

#: The prefix of a rebuild's own consumer group, for its journal offsets (the live group
#: keeps its own): `<app>.reset.<epoch ms>`, a fresh one per attempt, so an attempt never
#: starts from offsets an interrupted one committed (its state was deleted since).
REBUILD_GROUP = "{app}.reset"


class ResetError(ReplayError):
    """A reset that cannot go on as asked: the reason says what to do."""


@dataclass
class ResetPlan:
    """What a reset does, kept beside the state directory until it is done."""

    journal: Plan
    #: The payments table the reset replaces (digest and key count), for `--verify`.
    expected_sha256: str | None
    expected_keys: int
    started_at: int = field(default_factory=lambda: int(time.time() * 1000))

    def save(self, path: Path) -> None:
        """Whole or not at all (a kill mid-write leaves the previous plan)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = asdict(self)
        doc["journal"] = asdict(self.journal)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(doc, indent=1))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> ResetPlan:
        doc = json.loads(path.read_text())
        j = doc["journal"]
        journal = Plan(j["replay_id"], j["journal"], {int(k): v for k, v in j["start"].items()},
                       {int(k): v for k, v in j["stop"].items()}, j["created_at"])  # fmt: skip
        return cls(journal, doc["expected_sha256"], doc["expected_keys"], doc["started_at"])


def plan_path(live: Settings) -> Path:
    """Beside the state directory, which the reset deletes."""
    return live.data_dir / f"{live.app_id}.reset-plan.json"


# ---- the group ----------------------------------------------------------------------------
#: Broker answers that are no error here: the group or member is already gone.
_GONE = (0, 25, 69)  # NONE, UNKNOWN_MEMBER_ID, GROUP_ID_NOT_FOUND


async def group_members(admin: AIOKafkaAdminClient, group: str) -> list[tuple[str, str, str]]:
    """(member id, client id, host) of each member of `group` now. A coordinator that
    cannot say (loading, moved) is an error, never "no members"."""
    node = await admin.find_coordinator(group)
    response = await admin._send_request_to_node(node, DescribeGroupsRequest([group]))
    members = []
    for g in response.to_object()["groups"]:
        if g["error_code"] != 0:
            raise ResetError(f"group {group}: the coordinator answered error {g['error_code']}; "
                             "try again")  # fmt: skip
        members += [(m["member_id"], m["client_id"], m["client_host"]) for m in g["members"]]
    return members


async def remove_members(admin: AIOKafkaAdminClient, group: str, ids: list[str]) -> None:
    """Take members out of the group, as Kafka's `removeMembersFromConsumerGroup`: meant
    for workers that died within their session timeout (a live one simply joins again)."""
    node = await admin.find_coordinator(group)
    for member_id in ids:
        response = await admin._send_request_to_node(node, LeaveGroupRequest(group, member_id))
        code = response.to_object().get("error_code", 0)
        if code not in _GONE:
            raise ResetError(f"group {group}: removing member {member_id} failed (error {code})")


async def rebuild_groups(admin: AIOKafkaAdminClient, live: Settings) -> list[str]:
    """The groups of this application's rebuilds, past or running (one per attempt)."""
    prefix = REBUILD_GROUP.format(app=live.app_id) + "."
    return [g for g, *_ in await admin.list_consumer_groups() if g.startswith(prefix)]


# ---- the actions --------------------------------------------------------------------------
def changelogs(live: Settings) -> list[str]:
    return [spec.name for spec in internal_specs(live)]


async def _gone(admin: AIOKafkaAdminClient, names: list[str], timeout_s: float = 60.0) -> None:
    """Topic deletion is asynchronous: wait until none of `names` is listed any more."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while set(names) & set(await admin.list_topics()):
        if loop.time() > deadline:
            raise ResetError(f"topics still being deleted after {timeout_s:.0f}s: {names}")
        await asyncio.sleep(0.2)  # the broker's deletion, polled


async def _uncovered(live: Settings, plan: Plan) -> list[str]:
    """Tasks whose state the planned entries would not rebuild whole: the first entry
    replayed found state already there (its recorded changelog offsets), or no entry is
    planned while the task's changelogs hold records. A position after the start, or a
    journal that begins after the application did (retention, an upgrade)."""
    out = []
    c = consumer(live.bootstrap)
    await c.start()
    try:
        for p in sorted(plan.stop):
            jtp = TopicPartition(plan.journal, p)
            first = await first_entry(c, jtp, plan.start[p], plan.stop[p])
            if first is not None and first.changelog:
                out.append(f"task {p}: state existed before journal offset {plan.start[p]}")
            elif first is None:
                tps = [TopicPartition(t, p) for t in changelogs(live)]
                known = [tp for tp in tps if tp in set(await partitions(c, tp.topic, 2.0))]
                ends = await c.end_offsets(known) if known else {}
                if any(ends.values()):
                    out.append(f"task {p}: its changelogs hold state no journal entry rebuilds")
    finally:
        await c.stop()
    return out


@dataclass
class ResetSummary:
    entries: int = 0
    records: int = 0
    seconds: float = 0.0
    working_seconds: float = 0.0
    verified: bool | None = None
    rebuilt_sha256: str | None = None
    expected_sha256: str | None = None
    keys: int = 0
    diffs: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.records / self.working_seconds if self.working_seconds > 0 else 0.0


async def reset(
    live: Settings, *, to_offsets: str | None = None, to_datetime: str | None = None,
    by_duration: str | None = None, force: bool = False, dry_run: bool = False,
    verify: bool = False, discard_earlier_state: bool = False, out: TextIO = sys.stdout,
    stall_s: float = 600.0,
) -> ResetSummary | None:  # fmt: skip
    """Reset the live application (the module docstring); None for a dry run. Raises
    ResetError, before any change, when it cannot."""
    group = live.app_id
    say = lambda line: print(line, file=out, flush=True)  # noqa: E731
    admin = AIOKafkaAdminClient(bootstrap_servers=live.bootstrap)
    await admin.start()
    try:
        members = await group_members(admin, group)
        if members and not force:
            listed = ", ".join(f"{cid}@{host} ({mid})" for mid, cid, host in members)
            raise ResetError(f"group {group} has {len(members)} active member(s): {listed}. "
                             "Stop every worker first, or --force to remove members that "
                             "died within their session timeout")  # fmt: skip
        for g in await rebuild_groups(admin, live):
            if await group_members(admin, g):
                raise ResetError(f"another reset of {live.app_id} is running (group {g})")
        saved = plan_path(live)
        plan = await _plan(live, saved, say, to_offsets, to_datetime, by_duration)
        j = plan.journal
        uncovered = await _uncovered(live, j)
        if uncovered and not discard_earlier_state:
            raise ResetError(
                "the journal from this position does not rebuild the whole state ("
                + "; ".join(uncovered) + "): the state before it would be lost, idempotency "
                "keys with it. Reset from the start, or pass --discard-earlier-state to "
                "start the state over from there"
            )  # fmt: skip
        existing = set(await admin.list_topics())
        topics = [t for t in changelogs(live) if t in existing]
        committed = await admin.list_consumer_group_offsets(group)
        actions = _actions(live, plan, members, existing, len(committed), verify, saved)
        if uncovered:
            actions.append("discard the state from before the position (--discard-earlier-"
                           "state): " + "; ".join(uncovered))  # fmt: skip
        for line in actions:
            say(("would " if dry_run else "") + line)
        if dry_run:
            return None
        if members:
            say(f"warning: removing {len(members)} member(s) of {group}: a worker still "
                "running joins again and must be stopped")  # fmt: skip
            await remove_members(admin, group, [mid for mid, _, _ in members])
            await _stays_empty(admin, group, live.session_timeout_ms / 1000 / 3 + 1.0)
        replaced: dict[bytes, bytes] | None = None
        if saved.exists():
            plan.save(saved)  # as carried on (a dry run saves nothing)
        else:
            if verify:
                replaced = await live_table(live, PAYMENTS, j.journal, j.stop)
                before = digest(replaced)
                plan.expected_sha256, plan.expected_keys = before.sha256, before.keys
            plan.save(saved)  # from here on, a rerun finishes this reset
        await _stays_empty(admin, group, 0.0)  # the last look before anything is deleted
        if topics:
            await _delete_topics(admin, topics)
    finally:
        await admin.close()
    if state_dir(live).exists():
        shutil.rmtree(state_dir(live))
    await create_topics(live, log=None)
    summary, rebuilt = await _rebuild(live, plan, out, stall_s)
    if verify and plan.expected_sha256 is None:
        say("verify: not possible, the reset did not read the table it replaced (it was "
            "interrupted before, or the journal moved on since)")  # fmt: skip
    elif verify:
        summary.expected_sha256 = plan.expected_sha256
        summary.verified = summary.rebuilt_sha256 == plan.expected_sha256
        if not summary.verified:
            summary.diffs = [f"the replaced table had {plan.expected_keys} keys"]
            if replaced is not None:  # not when finishing an interrupted reset: it is gone
                summary.diffs = differences(rebuilt, replaced)
    saved.unlink(missing_ok=True)
    return summary


async def _plan(live: Settings, saved: Path, say: Callable[[str], None], to_offsets: str | None,
                to_datetime: str | None, by_duration: str | None) -> ResetPlan:  # fmt: skip
    """A new plan, or the interrupted reset's, carried to the journal's end if the journal
    moved on since (a worker ran on partly rebuilt state: what it recorded is rebuilt too,
    and the table it replaced can no longer be compared). Saved by the caller."""
    if not saved.exists():
        journal = await make_plan(live, "reset", from_offsets=to_offsets, from_time=to_datetime,
                                  from_duration=by_duration)  # fmt: skip
        return ResetPlan(journal, None, 0)
    try:
        plan = ResetPlan.load(saved)
    except (ValueError, KeyError) as exc:
        raise ResetError(
            f"the saved plan {saved} cannot be read ({exc}): remove it to plan "
            "a new reset (the changelogs may be partly rebuilt)"
        ) from None
    say(f"finishing the reset interrupted at {utc(plan.started_at)} (its plan: {saved}); "
        "the positions given now are ignored")  # fmt: skip
    now = await make_plan(live, "reset")
    moved = {p: e for p, e in now.stop.items() if e > plan.journal.stop.get(p, 0)}
    if moved:
        say("warning: the journal moved on since that plan (a worker ran on partly rebuilt "
            "state): rebuilding up to its end now, " + ", ".join(
                f"task {p} to {e}" for p, e in sorted(moved.items())))  # fmt: skip
        plan.journal.stop.update(moved)
        plan.expected_sha256, plan.expected_keys = None, 0
    return plan


def _actions(
    live: Settings, plan: ResetPlan, members: list[tuple[str, str, str]], existing: set[str],
    committed: int, verify: bool, saved: Path,
) -> list[str]:  # fmt: skip
    """Every step of the reset, as the dry run prints it."""
    j, group = plan.journal, live.app_id
    actions = []
    if members:
        actions.append(f"remove {len(members)} member(s) from group {group} (--force): "
                       + ", ".join(mid for mid, _, _ in members))  # fmt: skip
    if verify and plan.expected_sha256 is None and not saved.exists():
        actions.append("read the payments table about to be replaced, for --verify")
    if not saved.exists():
        actions.append(f"save the plan to {saved} (a rerun finishes this reset)")
    actions += [f"delete topic {t} (and create it again, empty)" if t in existing
                else f"create topic {t} (empty)" for t in changelogs(live)]  # fmt: skip
    actions.append(f"delete the state directory {state_dir(live)}")
    entries = sum(j.stop[p] - j.start[p] for p in j.stop)
    tasks = ", ".join(f"task {p} offsets {j.start[p]}..{j.stop[p]}" for p in sorted(j.stop))
    actions.append(f"rebuild every table from journal {j.journal}: {entries} journal "
                   f"offsets (each transaction, and its commit marker), {tasks}")  # fmt: skip
    actions.append(
        "keep every other topic: the inputs, the outputs, the journal, and the "
        "saga's repartition topic (recorded input of the saga, and its audit trail)"
    )
    actions.append(
        f"leave the input offsets of group {group} as they are ({committed} "
        "partitions): a restarted worker goes on where the live run stopped"
    )
    return actions


async def _stays_empty(admin: AIOKafkaAdminClient, group: str, for_s: float) -> None:
    """The live group has no member now, and none comes back for `for_s` (a worker removed
    by --force learns it at its next heartbeat, and joins again if it is alive)."""
    loop = asyncio.get_running_loop()
    until = loop.time() + for_s
    while True:
        back = await group_members(admin, group)
        if back:
            raise ResetError(
                f"group {group} has members again: "
                f"{', '.join(m for m, _, _ in back)}; a worker is running"
            )
        if loop.time() >= until:
            return
        await asyncio.sleep(0.5)  # polling the group, until the deadline


async def _delete_topics(admin: AIOKafkaAdminClient, topics: list[str]) -> None:
    response = await admin.delete_topics(topics)
    failed = [(t["topic"], t["error_code"]) for t in response.to_object()["topic_error_codes"]
              if t["error_code"] not in (0, 3)]  # fmt: skip
    if failed:
        raise ResetError(f"deleting the changelogs failed: {failed} (is topic deletion "
                         "disabled on the brokers?)")  # fmt: skip
    await _gone(admin, topics)


async def _rebuild(live: Settings, plan: ResetPlan, out: TextIO,
                   stall_s: float) -> tuple[ResetSummary, dict[bytes, bytes]]:  # fmt: skip
    """Re-execute the planned journal entries as the live application, changelogs only,
    under a group of its own for this attempt; the summary, and the rebuilt payments
    table."""
    from paysaga.streams.app.assembly import create_engine

    j = plan.journal
    start, stop = j.engine_bounds()
    attempt = f"{REBUILD_GROUP.format(app=live.app_id)}.{int(time.time() * 1000)}"
    engine = create_engine(live, start=start, stop=stop, group_id=attempt,
                           replay=ReplaySource(j.journal, {}, rebuild=True))  # fmt: skip
    try:
        run = await run_to_end(engine, progress_display(j, out, "reset"), stall_s,
                               "the rebuild")  # fmt: skip
    except ReplayError as exc:
        raise ResetError(f"{exc}; the state is partly rebuilt: fix the cause and run "
                         "paysaga reset again to finish it") from None  # fmt: skip
    d = digest(run.payments)
    summary = ResetSummary(run.entries, run.records, run.seconds, run.working_seconds,
                           rebuilt_sha256=d.sha256, keys=d.keys)  # fmt: skip
    admin = AIOKafkaAdminClient(bootstrap_servers=live.bootstrap)
    await admin.start()
    try:
        for g in await rebuild_groups(admin, live):  # this attempt's, and any left before
            await delete_group(admin, g)
    except (KafkaError, ReplayError) as exc:  # harmless: a fresh group per attempt
        print(f"warning: a rebuild's group was not deleted: {exc}", file=out)
    finally:
        await admin.close()
    return summary, run.payments


def print_summary(live: Settings, s: ResetSummary, out: TextIO = sys.stdout) -> None:
    print(f"reset {live.app_id}: {s.entries} transactions, {s.records} records re-executed "
          f"in {s.seconds:.1f} s ({s.rate:,.0f} records/s from the first commit); payments "
          f"table {s.keys} keys, sha256 {s.rebuilt_sha256}", file=out)  # fmt: skip
    if s.verified is True:
        print("verify: identical to the payments table it replaced", file=out)
    elif s.verified is False:
        print(f"verify: DIFFERENT from the table it replaced (sha256 {s.expected_sha256})",
              file=out)  # fmt: skip
        for d in s.diffs:
            print(f"  {d}", file=out)
    print(
        "start the workers again; on another machine that ran one, delete its state "
        f"directory ({state_dir(live).name} under its data dir) first",
        file=out,
    )
