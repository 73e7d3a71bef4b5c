"""`paysaga replay`: re-execute the live application's history into an isolated one
(docs/replay.md).

A replay reads the live journal (streams/engine/journal.py) as its only input, task by
task, and re-executes each recorded transaction on the records it names, read from the
live topics, with the clock the live batch read. It writes only under its own prefix
(`<live prefix>replay.<ID>.`), with its own application id, consumer group, changelogs
and state directory: the commands it would send stay on its own topics, where no service
reads them, and the answers it needs are the live ones already recorded. So a replay is a
pure function of recorded input, and `--verify` can demand an identical payments table.

Positions are checked before anything is written: an offset past the end, or one whose
records the retention already removed, is refused with the partition named.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.protocol.admin import DeleteGroupsRequest
from aiokafka.structs import TopicPartition

from paysaga.domain.card import redact
from paysaga.streams.app.kafka_io import consumer, iter_partitions, iter_records, partitions
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import Topics, changelog_topic, create_topics
from paysaga.streams.app.topology import load_topology
from paysaga.streams.engine import StartAt
from paysaga.streams.engine.config import ReplaySource
from paysaga.streams.engine.journal import Entry, JournalError
from paysaga.streams.engine.journal import decode as decode_entry
from paysaga.streams.engine.partitioner import partition_for
from paysaga.streams.ops.redrive import parse_time
from paysaga.tables.payments import PAYMENTS

#: Where a replay remembers its plan, in its state directory (a resume keeps its bounds).
PLAN_FILE = "replay-plan.json"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_DURATION = re.compile(r"^P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?$")


class ReplayError(ValueError):
    """A replay that cannot start as asked: the reason names the partition or the id."""


def parse_duration(text: str) -> int:
    """An ISO 8601 duration in days, hours, minutes and seconds (`P1D`, `PT12H`,
    `P1DT30M`), as kafka-streams-application-reset spells it: milliseconds."""
    m = _DURATION.fullmatch(text)
    if m is None or text in ("P", "PT"):
        raise ReplayError(f"duration {text!r}: expected ISO 8601 such as P1D or PT6H")
    days, hours, minutes, seconds = (int(g or 0) for g in m.groups())
    return (((days * 24 + hours) * 60 + minutes) * 60 + seconds) * 1000


def replay_settings(live: Settings, replay_id: str) -> Settings:
    """The replay's own application: id, group, prefix and state, beside the live one."""
    if not _ID.fullmatch(replay_id):
        raise ReplayError(f"replay id {replay_id!r}: letters, digits, - and _ (up to 64)")
    live_inputs = live.input_topic_prefix if live.input_topic_prefix is not None else (
        live.topic_prefix)  # fmt: skip
    return live.model_copy(update={
        "app_id": f"{live.app_id}.replay.{replay_id}",
        "topic_prefix": f"{live.topic_prefix}replay.{replay_id}.",
        "input_topic_prefix": live_inputs,
    })  # fmt: skip


def rename_map(live: Settings, replay: Settings) -> dict[str, str]:
    """Live internal topic -> the replay's: every source of the topology that is not an
    input (inputs are read under the live names by both)."""
    inputs = set(Topics(replay.topic_prefix, replay.input_topic_prefix).inputs)
    out = {}
    for name in load_topology(replay).sources:
        if name not in inputs and name.startswith(replay.topic_prefix):
            out[live.topic_prefix + name[len(replay.topic_prefix) :]] = name
    return out


@dataclass(frozen=True)
class Position:
    topic: str
    partition: int
    offset: int


def parse_positions(text: str, live: Settings) -> list[Position]:
    """`topic:partition:offset,...`; a topic without the live prefix gets it."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            topic, p, o = part.rsplit(":", 2)
            pos = Position(topic, int(p), int(o))
        except ValueError:
            raise ReplayError(f"position {part!r}: expected topic:partition:offset") from None
        if pos.partition < 0 or pos.offset < 0:
            raise ReplayError(f"position {part!r}: negative partition or offset")
        if not pos.topic.startswith(live.topic_prefix):
            pos = Position(live.topic_prefix + pos.topic, pos.partition, pos.offset)
        out.append(pos)
    if not out:
        raise ReplayError("no positions given")
    return out


@dataclass
class Plan:
    """Where each task's replay starts and stops, in the live journal's offsets."""

    replay_id: str
    journal: str
    start: dict[int, int]
    stop: dict[int, int]
    created_at: int = field(default_factory=lambda: int(time.time() * 1000))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> Plan:
        doc = json.loads(path.read_text())
        return cls(doc["replay_id"], doc["journal"], {int(k): v for k, v in doc["start"].items()},
                   {int(k): v for k, v in doc["stop"].items()}, doc["created_at"])  # fmt: skip

    def engine_bounds(self) -> tuple[dict[TopicPartition, StartAt], dict[TopicPartition, int]]:
        start = {TopicPartition(self.journal, p): StartAt(offset=o) for p, o in self.start.items()}
        stop = {TopicPartition(self.journal, p): o for p, o in self.stop.items()}
        return start, stop


async def _entries(c: AIOKafkaConsumer, tp: TopicPartition, end: int) -> list[tuple[int, Entry]]:
    """Every journal entry of `tp` below `end`, with its offset."""
    begin = (await c.beginning_offsets([tp]))[tp]
    if begin >= end:
        return []
    c.assign([tp])
    c.seek(tp, begin)
    out: list[tuple[int, Entry]] = []
    while await c.position(tp) < end:
        for records in (await c.getmany(tp, timeout_ms=200, max_records=5000)).values():
            for r in records:
                if r.offset < end:
                    try:
                        out.append((r.offset, decode_entry(r.value)))
                    except JournalError as exc:
                        raise ReplayError(f"{tp.topic}[{tp.partition}]@{r.offset}: {exc}") from None
    return out


async def make_plan(live: Settings, replay_id: str, *, from_offsets: str | None = None,
                    from_time: str | None = None, from_duration: str | None = None,
                    to_offsets: str | None = None, to_time: str | None = None) -> Plan:  # fmt: skip
    """Resolve the asked positions to journal offsets per task, or say which partition
    cannot be replayed from there (past its end, or before its retention)."""
    if sum(x is not None for x in (from_offsets, from_time, from_duration)) > 1:
        raise ReplayError("give one of --from-offsets, --from-time and --from-duration")
    journal = Topics(live.topic_prefix).journal
    c = consumer(live.bootstrap)
    await c.start()
    try:
        tps = await partitions(c, journal)
        if not tps:
            raise ReplayError(f"no journal {journal}: does the live application exist?")
        ends = await c.end_offsets(tps)
        begins = await c.beginning_offsets(tps)
        start = {tp.partition: begins[tp] for tp in tps}
        stop = {tp.partition: ends[tp] for tp in tps}
        since = None
        if from_time is not None:
            since = _time(from_time)
        elif from_duration is not None:
            since = int(time.time() * 1000) - parse_duration(from_duration)
        if since is not None:
            found = await c.offsets_for_times({tp: since for tp in tps})
            for tp in tps:
                hit = found.get(tp)
                start[tp.partition] = ends[tp] if hit is None else hit.offset
                if begins[tp] > 0 and hit is not None and hit.offset == begins[tp]:
                    kept = await _entries(c, tp, begins[tp] + 1)
                    if kept and kept[0][1].now > since:
                        raise ReplayError(
                            f"{journal}[{tp.partition}]: {from_time or from_duration} is "
                            f"before its retention (the earliest entry kept is later)")  # fmt: skip
        if to_time is not None:
            found = await c.offsets_for_times({tp: _time(to_time) + 1 for tp in tps})
            for tp in tps:
                hit = found.get(tp)
                stop[tp.partition] = ends[tp] if hit is None else hit.offset
        if from_offsets is not None or to_offsets is not None:
            await _offsets_to_journal(c, live, journal, tps, ends, start, stop,
                                      from_offsets, to_offsets)  # fmt: skip
        await _check_retained(c, journal, tps, start, stop)
    finally:
        await c.stop()
    for p in start:
        if start[p] > stop[p]:
            raise ReplayError(f"{journal}[{p}]: the start is after the stop")
    return Plan(replay_id, journal, start, stop)


def _time(text: str) -> int:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise ReplayError(str(exc)) from None


async def _offsets_to_journal(c: AIOKafkaConsumer, live: Settings, journal: str,
                              tps: list[TopicPartition], ends: dict[TopicPartition, int],
                              start: dict[int, int], stop: dict[int, int],
                              from_offsets: str | None,
                              to_offsets: str | None) -> None:  # fmt: skip
    """Input positions -> journal offsets: a replay starts at the first recorded
    transaction that read the position, and stops before the first that read past it."""
    for text, into, first in ((from_offsets, start, True), (to_offsets, stop, False)):
        if text is None:
            continue
        for pos in parse_positions(text, live):
            tp = TopicPartition(pos.topic, pos.partition)
            have = (await c.end_offsets([tp])) if tp in await _known(c, pos.topic) else None
            if have is None:
                raise ReplayError(f"{pos.topic}[{pos.partition}]: no such topic partition")
            begin = (await c.beginning_offsets([tp]))[tp]
            if pos.offset > have[tp]:
                raise ReplayError(f"{pos.topic}[{pos.partition}]: offset {pos.offset} is past "
                                  f"its end ({have[tp]})")  # fmt: skip
            if pos.offset < begin:
                raise ReplayError(f"{pos.topic}[{pos.partition}]: offset {pos.offset} is before "
                                  f"its retention (earliest kept: {begin})")  # fmt: skip
            jtp = TopicPartition(journal, pos.partition)
            if jtp not in tps:
                raise ReplayError(f"{pos.topic}[{pos.partition}]: no task reads this partition")
            found = ends[jtp]
            for offset, entry in await _entries(c, jtp, ends[jtp]):
                if any(t == pos.topic and p == pos.partition and last >= pos.offset
                       for t, p, _, last in entry.inputs):  # fmt: skip
                    found = offset
                    break
            into[pos.partition] = found if first else min(stop[pos.partition], found)


async def _known(c: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    return await partitions(c, topic, timeout=2.0)


async def _check_retained(c: AIOKafkaConsumer, journal: str, tps: list[TopicPartition],
                          start: dict[int, int], stop: dict[int, int]) -> None:  # fmt: skip
    """The first entry each task replays names records the live topics still hold."""
    for tp in tps:
        at = start[tp.partition]
        if at >= stop[tp.partition]:
            continue
        entries = [e for o, e in await _entries(c, tp, at + 1) if o == at]
        if not entries:
            continue
        for topic, part, first, _ in entries[0].inputs:
            itp = TopicPartition(topic, part)
            begin = (await c.beginning_offsets([itp]))[itp]
            if first < begin:
                raise ReplayError(f"{topic}[{part}]: offset {first}, where the replay of task "
                                  f"{tp.partition} starts, is before its retention (earliest "
                                  f"kept: {begin})")  # fmt: skip


# ---- existence, cleanup -----------------------------------------------------------------
def state_dir(settings: Settings) -> Path:
    return settings.data_dir / settings.app_id


async def exists(settings: Settings) -> bool:
    """The replay id was used: its state directory, or its group's committed offsets."""
    if state_dir(settings).exists():
        return True
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
    await admin.start()
    try:
        return bool(await admin.list_consumer_group_offsets(settings.app_id))
    finally:
        await admin.close()


async def cleanup(live: Settings, replay_id: str, out: TextIO = sys.stdout) -> int:
    """Delete a replay's topics, consumer group and state directory."""
    settings = replay_settings(live, replay_id)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
    await admin.start()
    try:
        names = [t for t in await admin.list_topics()
                 if t.startswith(settings.topic_prefix)
                 or (t.startswith(f"{settings.app_id}-") and t.endswith("-changelog"))]  # fmt: skip
        if names:
            await admin.delete_topics(names)
        await delete_group(admin, settings.app_id)
    finally:
        await admin.close()
    shutil.rmtree(state_dir(settings), ignore_errors=True)
    print(f"replay {replay_id}: deleted {len(names)} topics, group {settings.app_id}, "
          f"state {state_dir(settings)}", file=out)  # fmt: skip
    return 0


async def delete_group(admin: AIOKafkaAdminClient, group: str) -> None:
    """Delete a consumer group; an unknown one is no error (nothing is left to delete). A
    group with members (NON_EMPTY_GROUP) is: something still runs under it."""
    node = await admin.find_coordinator(group)
    response = await admin._send_request_to_node(node, DeleteGroupsRequest([group]))
    for result in response.to_object()["results"]:
        if result["error_code"] not in (0, 69):  # GROUP_ID_NOT_FOUND: gone already
            why = "it has members" if result["error_code"] == 68 else "error"
            raise ReplayError(f"group {group} was not deleted: {why} "
                              f"({result['error_code']})")  # fmt: skip


async def replayed_payment(live: Settings, replay_id: str, payment_id: str) -> bytes | None:
    """The payment as replay `replay_id` left it (the `payments` table's JSON), or None:
    the last value of its key in the replay's payments changelog. No worker serves a
    replay's state, and its changelog is the committed truth of it."""
    settings = replay_settings(live, replay_id)
    if not await exists(settings):
        raise ReplayError(f"no replay {replay_id}")
    key = payment_id.encode()
    tp = TopicPartition(changelog_topic(settings, PAYMENTS), partition_for(key, live.partitions))
    value = None
    async for r in iter_partitions(live.bootstrap, [tp], timeout=60):
        if r.key == key:
            value = r.value
    return value


# ---- the digest -------------------------------------------------------------------------
@dataclass
class Digest:
    """A table's content, as a hash over its sorted keys and values."""

    sha256: str
    keys: int
    values: dict[bytes, bytes]


def digest(items: dict[bytes, bytes]) -> Digest:
    h = hashlib.sha256()
    for k in sorted(items):
        v = items[k]
        h.update(len(k).to_bytes(4, "big") + k + len(v).to_bytes(4, "big") + v)
    return Digest(h.hexdigest(), len(items), items)


async def live_table(live: Settings, table: str, journal: str,
                     stop: dict[int, int]) -> dict[bytes, bytes]:  # fmt: skip
    """The live `table` as it stood after the last transaction each task replayed: its
    changelog folded up to the offset the next journal entry records (to the end when
    none followed)."""
    topic = changelog_topic(live, table)
    upto: dict[int, int | None] = {}
    c = consumer(live.bootstrap)
    await c.start()
    try:
        for p, at in stop.items():
            jtp = TopicPartition(journal, p)
            end = (await c.end_offsets([jtp]))[jtp]
            nxt = await first_entry(c, jtp, at, end)
            upto[p] = dict(nxt.changelog).get(table, -1) if nxt is not None else None
    finally:
        await c.stop()
    out: dict[bytes, bytes] = {}
    async for r in iter_records(live.bootstrap, topic, follow=False, timeout=300):
        limit = upto.get(r.partition)
        if limit is not None and r.offset > limit:
            continue
        if r.value is None:
            out.pop(r.key, None)
        else:
            out[r.key] = r.value
    return out


async def first_entry(c: AIOKafkaConsumer, tp: TopicPartition, at: int,
                      end: int) -> Entry | None:  # fmt: skip
    """The first journal entry of `tp` at or after offset `at`, before `end`."""
    if at >= end:
        return None
    c.assign([tp])
    c.seek(tp, at)
    while True:
        for records in (await c.getmany(tp, timeout_ms=200, max_records=1)).values():
            for r in records:
                return decode_entry(r.value) if r.offset < end else None
        if await c.position(tp) >= end:
            return None


def differences(a: dict[bytes, bytes], b: dict[bytes, bytes], n: int = 8) -> list[str]:
    """The first keys whose values differ, with both values (bounded, redacted)."""
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            show = ["<absent>" if x is None else redact(x.decode("utf-8", "replace")[:300]) or "''"
                    for x in (a.get(k), b.get(k))]  # fmt: skip
            out.append(f"{k.decode('utf-8', 'replace')}: replayed {show[0]} | live {show[1]}")
            if len(out) >= n:
                break
    return out


# ---- running it -------------------------------------------------------------------------
@dataclass
class Summary:
    replay_id: str
    entries: int
    records: int
    seconds: float
    verified: bool | None = None
    replayed_digest: str | None = None
    live_digest: str | None = None
    keys: int = 0
    diffs: list[str] = field(default_factory=list)
    #: From its first commit seen to its end: the re-execution, without the start-up
    #: (joining the group, opening the tasks), as the live figures are measured.
    working_seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0

    @property
    def working_rate(self) -> float:
        return self.records / self.working_seconds if self.working_seconds > 0 else 0.0


async def run_replay(live: Settings, plan: Plan, verify: bool, out: TextIO = sys.stdout,
                     stall_s: float = 600.0) -> Summary:  # fmt: skip
    from paysaga.streams.app.assembly import create_engine

    settings = replay_settings(live, plan.replay_id)
    plan_path = state_dir(settings) / PLAN_FILE
    plan.save(plan_path)
    await create_topics(settings, log=None)
    start, stop = plan.engine_bounds()
    source = ReplaySource(plan.journal, rename_map(live, settings))
    engine = create_engine(settings, start=start, stop=stop, replay=source)
    progress = progress_display(plan, out, f"replay {plan.replay_id}")
    run = await run_to_end(engine, progress, stall_s, f"the replay {plan.replay_id}")
    summary = Summary(plan.replay_id, run.entries, run.records, run.seconds,
                      working_seconds=run.working_seconds)  # fmt: skip
    if verify:
        theirs = await live_table(live, PAYMENTS, plan.journal, plan.stop)
        a, b = digest(run.payments), digest(theirs)
        summary.verified = a.sha256 == b.sha256
        summary.replayed_digest, summary.live_digest, summary.keys = a.sha256, b.sha256, a.keys
        if not summary.verified:
            summary.diffs = differences(run.payments, theirs)
    return summary


@dataclass
class Run:
    """What a replay-mode engine did, from its start to its stop."""

    entries: int
    records: int
    seconds: float
    #: From its first commit seen to its end (the re-execution without the start-up).
    working_seconds: float
    #: Its payments table at the end.
    payments: dict[bytes, bytes]


async def run_to_end(engine: Any, progress: Any, stall_s: float, what: str) -> Run:
    """Start a replay-mode `engine` (a replay, or a reset's rebuild), run it until every
    task reached its stop, and stop it. Raises ReplayError when it halted (a rebuild that
    met what its code refuses, or was fenced), when nothing committed for `stall_s`, or
    when it stayed unhealthy (a task broken, Kafka refusing) for a minute."""
    t0 = time.monotonic()
    await engine.start()
    try:
        loop = asyncio.get_running_loop()
        working = None
        last, moved_at, failing_since = -1.0, loop.time(), None
        while not await engine.finished():
            now = loop.time()
            if engine.shared.fatal is not None:
                raise ReplayError(f"{what} stopped: {engine.shared.fatal}")
            failing = engine.failed if engine.assigned else None
            failing_since = None if failing is None else (failing_since or now)
            if failing_since is not None and now - failing_since > 60:
                raise ReplayError(f"{what} stopped: unhealthy for a minute: {failing}")
            if engine.stats["batches"] != last:
                last, moved_at = engine.stats["batches"], now
            elif now - moved_at > stall_s:
                raise ReplayError(f"{what} committed nothing for {stall_s:.0f}s")
            if working is None and engine.stats["batches"]:
                working = time.monotonic()
            progress(engine, False)
            await asyncio.sleep(0.05)  # the progress display's pace (and the timing's grain)
        progress(engine, True)
        end = time.monotonic()
        payments: dict[bytes, bytes] = {}
        for p in sorted(engine.tasks):
            store = engine.store(PAYMENTS, p)
            if store is not None:
                payments.update(store.items())
        return Run(int(engine.stats["batches"]), int(engine.stats["records"]), end - t0,
                   end - (working or t0), payments)  # fmt: skip
    finally:
        await engine.stop()


def progress_display(plan: Plan, out: TextIO, label: str) -> Any:
    """Journal offsets re-executed and lag per task (of a replay, or a reset's rebuild): a
    rich bar on a terminal, a line every 5 s otherwise."""
    tty = hasattr(out, "isatty") and out.isatty()
    last = [0.0]
    total = sum(plan.stop[p] - plan.start[p] for p in plan.stop)
    bar = None
    if tty:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        bar = Progress(TextColumn(label + " {task.description}"), BarColumn(),
                       MofNCompleteColumn(), TextColumn("{task.fields[lag]}"))  # fmt: skip
        ids = {p: bar.add_task(f"task {p}", total=max(1, plan.stop[p] - plan.start[p]), lag="")
               for p in sorted(plan.stop)}  # fmt: skip
        bar.start()

    def show(engine: Any, final: bool) -> None:
        positions = {}
        for p in plan.stop:
            task = engine.tasks.get(p)
            at = task.next_offsets.get(TopicPartition(plan.journal, p)) if task else None
            positions[p] = plan.start[p] if at is None else at
        if final:  # through: what is left is the journal's last transaction marker
            positions = dict(plan.stop)
        if bar is not None:
            for p, at in positions.items():
                bar.update(ids[p], completed=at - plan.start[p], lag=f"lag {plan.stop[p] - at}")
            if final:
                bar.stop()
            return
        now = time.monotonic()
        if final or now - last[0] >= 5.0:
            last[0] = now
            done = sum(positions[p] - plan.start[p] for p in positions)
            lags = " ".join(f"p{p}:{plan.stop[p] - at}" for p, at in sorted(positions.items()))
            print(
                f"{label}: {done}/{total} journal offsets, "
                f"{int(engine.stats['records'])} records; lag {lags}",
                file=out,
                flush=True,
            )

    return show


def print_summary(s: Summary, out: TextIO = sys.stdout) -> None:
    print(f"replay {s.replay_id}: {s.entries} transactions, {s.records} records in "
          f"{s.seconds:.1f} s ({s.rate:,.0f} records/s; {s.working_rate:,.0f} records/s from "
          "its first commit)", file=out)  # fmt: skip
    if s.verified is None:
        return
    if s.verified:
        print(f"verify: identical payments table, {s.keys} keys, sha256 {s.replayed_digest}",
              file=out)  # fmt: skip
        return
    print(f"verify: DIFFERENT (replayed {s.replayed_digest}, live {s.live_digest})", file=out)
    for d in s.diffs:
        print(f"  {d}", file=out)
