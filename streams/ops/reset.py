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
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.protocol.admin import DescribeGroupsRequest
from aiokafka.protocol.group import LeaveGroupRequest

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
    live_table,
    make_plan,
    progress_display,
    run_to_end,
    state_dir,
)
from paysaga.tables.payments import PAYMENTS

#: The rebuild's own consumer group, for its journal offsets (the live group keeps its own).
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
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = asdict(self)
        doc["journal"] = asdict(self.journal)
        path.write_text(json.dumps(doc, indent=1))

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
async def group_members(admin: AIOKafkaAdminClient, group: str) -> list[tuple[str, str, str]]:
    """(member id, client id, host) of each member of `group` now."""
    node = await admin.find_coordinator(group)
    response = await admin._send_request_to_node(node, DescribeGroupsRequest([group]))
    members = []
    for g in response.to_object()["groups"]:
        members += [(m["member_id"], m["client_id"], m["client_host"]) for m in g["members"]]
    return members


async def remove_members(admin: AIOKafkaAdminClient, group: str, ids: list[str]) -> None:
    """Take members out of the group, as Kafka's `removeMembersFromConsumerGroup`: meant
    for workers that died within their session timeout (a live one simply joins again)."""
    node = await admin.find_coordinator(group)
    for member_id in ids:
        await admin._send_request_to_node(node, LeaveGroupRequest(group, member_id))


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


async def reset(live: Settings, *, to_offsets: str | None = None, to_datetime: str | None = None,
                by_duration: str | None = None, force: bool = False, dry_run: bool = False,
                verify: bool = False, out: TextIO = sys.stdout,
                timeout_s: float = 3600.0) -> ResetSummary | None:  # fmt: skip
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
        saved = plan_path(live)
        plan: ResetPlan | None = ResetPlan.load(saved) if saved.exists() else None
        if plan is not None:
            say(f"finishing the reset interrupted at {utc(plan.started_at)} "
                f"(its plan: {saved}); the positions given now are ignored")  # fmt: skip
        else:
            journal = await make_plan(live, "reset", from_offsets=to_offsets,
                                      from_time=to_datetime, from_duration=by_duration)  # fmt: skip
            plan = ResetPlan(journal, None, 0)
        existing = set(await admin.list_topics())
        topics = [t for t in changelogs(live) if t in existing]
        committed = await admin.list_consumer_group_offsets(group)
        j = plan.journal
        entries = sum(j.stop[p] - j.start[p] for p in j.stop)
        actions = []
        if members:
            actions.append(f"remove {len(members)} member(s) from group {group} (--force): "
                           + ", ".join(mid for mid, _, _ in members))  # fmt: skip
        actions += [f"delete topic {t} (and create it again, empty)" if t in existing
                    else f"create topic {t} (empty)" for t in changelogs(live)]  # fmt: skip
        actions.append(f"delete the state directory {state_dir(live)}")
        tasks = ", ".join(f"task {p} offsets {j.start[p]}..{j.stop[p]}" for p in sorted(j.stop))
        actions.append(f"rebuild every table from journal {j.journal}: {entries} journal "
                       f"offsets (each transaction, and its commit marker), {tasks}")  # fmt: skip
        actions.append(
            "keep every other topic: the inputs, the outputs, the journal, and the "
            "saga's repartition topic (recorded input of the saga, and its audit "
            "trail)"
        )
        actions.append(
            f"leave the input offsets of group {group} as they are ({len(committed)} "
            "partitions): a restarted worker goes on where the live run stopped"
        )
        for line in actions:
            say(("would " if dry_run else "") + line)
        if dry_run:
            return None
        if members:
            say(f"warning: removing {len(members)} member(s) of {group}: a worker still "
                "running joins again and must be stopped")  # fmt: skip
            await remove_members(admin, group, [mid for mid, _, _ in members])
            again = await group_members(admin, group)
            if again:
                raise ResetError(
                    f"group {group} has members again after --force: "
                    f"{', '.join(m for m, _, _ in again)}; a worker is running"
                )
        replaced: dict[bytes, bytes] | None = None
        if not saved.exists():
            if verify:
                replaced = await live_table(live, PAYMENTS, j.journal, j.stop)
                before = digest(replaced)
                plan.expected_sha256, plan.expected_keys = before.sha256, before.keys
            plan.save(saved)  # from here on, a rerun finishes this reset
        await delete_group(admin, REBUILD_GROUP.format(app=live.app_id))
        if topics:
            await admin.delete_topics(topics)
            await _gone(admin, topics)
    finally:
        await admin.close()
    shutil.rmtree(state_dir(live), ignore_errors=True)
    await create_topics(live, log=None)
    summary, rebuilt = await _rebuild(live, plan, out, timeout_s)
    if verify and plan.expected_sha256 is None:
        say("verify: not possible, the interrupted reset did not read the table it replaced")
    elif verify:
        summary.expected_sha256 = plan.expected_sha256
        summary.verified = summary.rebuilt_sha256 == plan.expected_sha256
        if not summary.verified:
            summary.diffs = [f"the replaced table had {plan.expected_keys} keys"]
            if replaced is not None:  # not when finishing an interrupted reset: it is gone
                summary.diffs = differences(rebuilt, replaced)
    saved.unlink(missing_ok=True)
    return summary


async def _rebuild(live: Settings, plan: ResetPlan, out: TextIO,
                   timeout_s: float) -> tuple[ResetSummary, dict[bytes, bytes]]:  # fmt: skip
    """Re-execute the planned journal entries as the live application, changelogs only;
    the summary, and the rebuilt payments table."""
    from paysaga.streams.app.assembly import create_engine

    j = plan.journal
    start, stop = j.engine_bounds()
    engine = create_engine(live, start=start, stop=stop, group_id=REBUILD_GROUP.format(
        app=live.app_id), replay=ReplaySource(j.journal, {}, rebuild=True))  # fmt: skip
    try:
        run = await run_to_end(engine, progress_display(j, out, "reset"), timeout_s,
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
        await delete_group(admin, REBUILD_GROUP.format(app=live.app_id))
    except KafkaError as exc:  # harmless: the next reset deletes it first
        print(f"warning: the rebuild's group was not deleted: {exc!r}", file=out)
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
