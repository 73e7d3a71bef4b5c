"""`paysaga dlq redrive`: re-inject dead letters into their original step, each one once.

After a fix (a missing payment created, a decoder corrected) the letters of a DLQ can be
sent back where they failed: the original key, bytes and headers go to the letter's source
topic, on its source partition, with `paysaga.redrive.*` headers saying which letter they
come from, how many times they were redriven and where they first failed (docs/dlq.md).

Exactly once per letter: the redriven record and a ledger record keyed by the letter's DLQ
`partition:offset` are written in ONE Kafka transaction, by a producer whose transactional
id is fixed per topic prefix. Starting it fences any earlier or concurrent redrive and
completes its open transaction; only then is the ledger read (read_committed), so a letter
is sent if and only if no committed ledger record names it. A run killed mid-way leaves
its last transaction aborted: neither its records nor their ledger entries are visible to
a committed reader, and the next run sends them again, once.

The planning (filters, ledger, cap, target partition) is pure: `plan` over parsed `Letter`s,
with no broker, so it is unit-tested on its own. What a redriven record does once applied
is its consumer's business: the saga deduplicates by event_id, intake by idempotency key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol, TextIO

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import ConsumerRecord

from paysaga.domain.payment import derived_id
from paysaga.streams.app.kafka_io import read_all
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import Topics
from paysaga.streams.engine.commit import FENCED_ERRORS
from paysaga.streams.engine.deadletter import (
    ERROR_CLASSES,
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
    H_REDRIVE_COUNT,
    H_REDRIVE_DLQ,
    H_REDRIVE_ID,
    H_RESUME_TOPIC,
    H_TOPIC,
    default_error_class,
    now_ms,
    original_headers,
    parse_headers,
)
from paysaga.streams.engine.partitioner import partition_for

DEFAULT_RATE = 100.0
DEFAULT_MAX_REDRIVES = 3
DEFAULT_BATCH = 50
#: A transaction is committed at the latest this long after it began, however slow the
#: rate: what a kill loses (to be sent again) stays small, and far from the broker's
#: transaction timeout.
MAX_TXN_SECONDS = 1.0
H_QUARANTINE_DLQ = "paysaga.quarantine.dlq"
H_QUARANTINED_AT = "paysaga.quarantined_at"

Headers = list[tuple[str, bytes]]


# ---- what a letter says -----------------------------------------------------------------
@dataclass(frozen=True)
class Origin:
    """Where a record was read from: topic, partition, offset (-1 when unknown)."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class Letter:
    """One DLQ record as redrive sees it: its place on the DLQ, its bytes, its headers."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    kind: str
    error_class: str
    #: Where it failed this time (and where a redrive sends it).
    source: Origin
    #: Where it failed the first time, before any redrive (= source if never redriven).
    origin: Origin
    first_failed_at: int | None
    last_failed_at: int | None
    redrive_count: int
    #: A review record that can be taken up again: where its value goes (None: not one).
    resume_topic: str | None = None

    @property
    def target(self) -> str:
        """The topic a redrive sends this letter to: its input's source topic, or the
        resume topic of a review record (docs/dlq.md#resuming-a-review)."""
        return self.resume_topic or self.source.topic

    @property
    def ref(self) -> str:
        """`partition:offset` on the DLQ: the letter's identity, and its ledger key."""
        return f"{self.partition}:{self.offset}"


def _int(h: Mapping[str, str], name: str) -> int | None:
    try:
        return int(h[name])
    except (KeyError, ValueError):
        return None


def _at(h: Mapping[str, str], topic: str, partition: str, offset: str) -> Origin:
    p, o = _int(h, partition), _int(h, offset)
    return Origin(h.get(topic, ""), -1 if p is None else p, -1 if o is None else o)


def letter_of(record: ConsumerRecord) -> Letter:
    """Parse a DLQ record; letters written before a header existed get its best stand-in
    (the class from the kind, the last failure from `paysaga.failed_at`)."""
    headers = tuple(record.headers or ())
    h = parse_headers(headers)
    kind = h.get(H_KIND, "?")
    source = _at(h, H_TOPIC, H_PARTITION, H_OFFSET)
    origin = _at(h, H_ORIGIN_TOPIC, H_ORIGIN_PARTITION, H_ORIGIN_OFFSET)
    last = _int(h, H_LAST_FAILED_AT)
    last = _int(h, H_FAILED_AT) if last is None else last
    first = _int(h, H_FIRST_FAILED_AT)
    return Letter(
        partition=record.partition, offset=record.offset, key=record.key, value=record.value,
        headers=headers, kind=kind,
        error_class=h.get(H_ERROR_CLASS) or default_error_class(kind), source=source,
        origin=origin if H_ORIGIN_TOPIC in h else source,
        first_failed_at=last if first is None else first, last_failed_at=last,
        redrive_count=_int(h, H_REDRIVE_COUNT) or 0, resume_topic=h.get(H_RESUME_TOPIC) or None,
    )  # fmt: skip


# ---- filters ----------------------------------------------------------------------------
@dataclass(frozen=True)
class OffsetRange:
    """Offsets `first` to `last` (inclusive; None: to the end) of one DLQ partition."""

    partition: int
    first: int
    last: int | None

    def contains(self, partition: int, offset: int) -> bool:
        if partition != self.partition or offset < self.first:
            return False
        return self.last is None or offset <= self.last


def parse_offsets(text: str) -> OffsetRange:
    """`P:FROM-TO`, `P:FROM-` (to the end) or `P:OFFSET` (one letter)."""
    try:
        part, _, span = text.partition(":")
        first, dash, last = span.partition("-")
        rng = OffsetRange(int(part), int(first), (int(last) if last else None) if dash
                          else int(first))  # fmt: skip
    except ValueError:
        raise ValueError(f"--offsets {text!r}: expected P:FROM-TO, P:FROM- or P:OFFSET") from None
    if rng.partition < 0 or rng.first < 0 or (rng.last is not None and rng.last < rng.first):
        raise ValueError(f"--offsets {text!r}: an empty or negative range")
    return rng


def parse_time(text: str) -> int:
    """Epoch millis, or an ISO 8601 time (UTC unless it says otherwise)."""
    if text.isdigit():
        return int(text)
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is neither epoch millis nor ISO 8601") from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return int(at.timestamp() * 1000)


@dataclass(frozen=True)
class Filters:
    """Which letters a redrive considers; an empty set means any."""

    kinds: frozenset[str] = frozenset()
    error_classes: frozenset[str] = frozenset()
    source_topics: frozenset[str] = frozenset()
    #: On the last failure time (epoch ms): `since` inclusive, `until` exclusive.
    since: int | None = None
    until: int | None = None
    offsets: tuple[OffsetRange, ...] = ()

    def __post_init__(self) -> None:
        unknown = self.error_classes - set(ERROR_CLASSES)
        if unknown:
            raise ValueError(f"--error-class {sorted(unknown)}: not one of {ERROR_CLASSES}")

    def accepts(self, letter: Letter) -> bool:
        if self.kinds and letter.kind not in self.kinds:
            return False
        if self.error_classes and letter.error_class not in self.error_classes:
            return False
        if self.source_topics and letter.source.topic not in self.source_topics:
            return False
        if self.since is not None or self.until is not None:
            at = letter.last_failed_at
            if at is None:
                return False
            if (self.since is not None and at < self.since) or (
                self.until is not None and at >= self.until
            ):
                return False
        return not self.offsets or any(
            r.contains(letter.partition, letter.offset) for r in self.offsets
        )


# ---- the plan ---------------------------------------------------------------------------
class Action(StrEnum):
    """What a redrive does with one letter, in the order it decides."""

    FILTERED = "filtered out"
    #: The ledger names it: sent (or quarantined) by an earlier run.
    DONE = "skipped (already done)"
    #: A review record (offset -1) without a resume: the saga decided, a human reviews.
    REVIEW = "not redrivable (review)"
    QUARANTINE = "quarantined"
    #: Its source topic does not exist (any more): it cannot be sent.
    UNSENDABLE = "cannot be sent"
    REDRIVE = "redriven"


@dataclass(frozen=True)
class Step:
    letter: Letter
    action: Action
    #: REDRIVE: the source topic's partition the record goes to.
    partition: int | None = None


def target_partition(letter: Letter, partitions: int) -> int:
    """The letter's source partition when its topic still has it, else where paysaga's
    partitioner puts its key (a keyless record: its source partition, wrapped)."""
    if 0 <= letter.source.partition < partitions:
        return letter.source.partition
    if letter.key is None:
        return max(letter.source.partition, 0) % partitions
    return partition_for(letter.key, partitions)


def decide(
    letter: Letter,
    filters: Filters,
    ledger: Mapping[str, Any],
    partitions: Mapping[str, int],
    max_redrives: int,
) -> Step:
    """The one decision for one letter (see `Action` for the order)."""
    if not filters.accepts(letter):
        return Step(letter, Action.FILTERED)
    if letter.ref in ledger:
        return Step(letter, Action.DONE)
    if letter.source.offset < 0 and letter.resume_topic is None:
        return Step(letter, Action.REVIEW)
    if letter.redrive_count >= max_redrives:
        return Step(letter, Action.QUARANTINE)
    count = partitions.get(letter.target, 0)
    if count <= 0:
        return Step(letter, Action.UNSENDABLE)
    return Step(letter, Action.REDRIVE, target_partition(letter, count))


def plan(
    letters: Iterable[Letter],
    filters: Filters,
    ledger: Mapping[str, Any],
    partitions: Mapping[str, int],
    max_redrives: int = DEFAULT_MAX_REDRIVES,
) -> list[Step]:
    return [decide(le, filters, ledger, partitions, max_redrives) for le in letters]


def redrive_id(dlq_topic: str, letter: Letter) -> str:
    """uuid5 of the DLQ topic and the letter's partition:offset: the same letter always
    gets the same id, so its copies can be counted (and told apart from other letters')."""
    return derived_id(dlq_topic, "redrive", letter.ref)


def redrive_headers(letter: Letter, dlq_topic: str) -> Headers:
    """The input's own headers as the step first read them, then where this copy comes
    from: its redrive id and count, the letter it was, and where it first failed."""
    o = letter.origin
    added = [
        (H_REDRIVE_ID, redrive_id(dlq_topic, letter).encode()),
        (H_REDRIVE_COUNT, str(letter.redrive_count + 1).encode()),
        (H_REDRIVE_DLQ, letter.ref.encode()),
        (H_ORIGIN_TOPIC, o.topic.encode()),
        (H_ORIGIN_PARTITION, str(o.partition).encode()),
        (H_ORIGIN_OFFSET, str(o.offset).encode()),
    ]
    if letter.first_failed_at is not None:
        added.append((H_ORIGIN_FIRST_FAILED_AT, str(letter.first_failed_at).encode()))
    return original_headers(letter.headers) + added


def quarantine_headers(letter: Letter, at: int) -> Headers:
    return [*letter.headers, (H_QUARANTINE_DLQ, letter.ref.encode()),
            (H_QUARANTINED_AT, str(at).encode())]  # fmt: skip


def ledger_entry(step: Step, topic: str, partition: int, dlq_topic: str, at: int) -> bytes:
    """The ledger's value for a letter redriven or quarantined (JSON, for operators)."""
    entry: dict[str, Any] = {
        "action": "quarantined" if step.action is Action.QUARANTINE else "redriven",
        "kind": step.letter.kind, "topic": topic, "partition": partition, "at": at,
    }  # fmt: skip
    if step.action is Action.REDRIVE:
        entry["redrive_id"] = redrive_id(dlq_topic, step.letter)
    return json.dumps(entry, sort_keys=True).encode()


def ledger_of(records: Iterable[ConsumerRecord]) -> dict[str, dict[str, Any]]:
    """The ledger as of its committed records: the latest entry per letter; a tombstone
    (an operator deleting an entry to allow one more redrive) removes it."""
    ledger: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.key is None:
            continue
        ref = r.key.decode()
        if r.value is None:
            ledger.pop(ref, None)
            continue
        try:
            ledger[ref] = dict(json.loads(r.value))
        except (ValueError, TypeError):
            ledger[ref] = {"action": "unreadable"}  # still a record: never send twice
    return ledger


# ---- reporting --------------------------------------------------------------------------
def by_kind_and_topic(steps: Iterable[Step]) -> Counter[tuple[Action, str, str]]:
    return Counter((s.action, s.letter.kind, s.letter.target) for s in steps)


def render_plan(steps: Sequence[Step], out: TextIO) -> None:
    """What a run would do (`--dry-run`): totals per action, then by kind and source topic."""
    totals = Counter(s.action for s in steps)
    print(f"dry run: {len(steps)} dead letters, nothing sent", file=out)
    print("  would be: " + ", ".join(f"{a.value} {totals[a]}" for a in _ORDER), file=out)
    for (action, kind, topic), n in sorted(by_kind_and_topic(steps).items()):
        if action is not Action.FILTERED:
            print(f"  {action.value:<24} {kind:<12} {topic or '?':<40} {n}", file=out)


_ORDER = (Action.REDRIVE, Action.DONE, Action.QUARANTINE, Action.FILTERED, Action.REVIEW,
          Action.UNSENDABLE)  # fmt: skip


@dataclass
class Outcome:
    """What a run did, by action and kind (`FAILED` counts letters that were to be sent but
    were not: a Kafka error, a fenced producer, or no source topic)."""

    done: Counter[tuple[str, str]] = field(default_factory=Counter)
    error: str | None = None

    def add(self, label: str, kind: str, n: int = 1) -> None:
        self.done[(label, kind)] += n

    @property
    def failed(self) -> int:
        return sum(n for (label, _), n in self.done.items() if label == FAILED)

    def render(self, out: TextIO, err: TextIO | None = None) -> None:
        """The summary on `out`; the error that stopped the run, if any, on `err`."""
        totals: Counter[str] = Counter()
        kinds: dict[str, Counter[str]] = {}
        for (label, kind), n in self.done.items():
            totals[label] += n
            kinds.setdefault(kind, Counter())[label] += n
        labels = [a.value for a in _ORDER if a is not Action.UNSENDABLE] + [FAILED]
        print("redrive: " + ", ".join(f"{lb} {totals[lb]}" for lb in labels), file=out)
        for kind in sorted(kinds):
            parts = ", ".join(f"{lb} {kinds[kind][lb]}" for lb in labels if kinds[kind][lb])
            print(f"  {kind}: {parts}", file=out)
        if self.error:
            print(f"error: {self.error}", file=err or out)


FAILED = "failed"


class Progress(Protocol):
    def advance(self, n: int) -> None: ...
    def close(self) -> None: ...


class PlainProgress:
    """Progress as plain lines (not a TTY: a log, a pipe), at most one a second."""

    def __init__(self, total: int, out: TextIO) -> None:
        self.total, self.out, self.done = total, out, 0
        self._last = 0.0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= 1.0 or self.done >= self.total:
            self._last = now
            print(f"redrive: {self.done}/{self.total} sent", file=self.out, flush=True)

    def close(self) -> None:
        pass


class RichProgress:
    """A rich progress bar on a terminal."""

    def __init__(self, total: int, out: TextIO) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as Bar

        self.bar = Bar(TextColumn("redrive"), BarColumn(), MofNCompleteColumn(),
                       TimeRemainingColumn(), console=Console(file=out))  # fmt: skip
        self.task = self.bar.add_task("redrive", total=total)
        self.bar.start()

    def advance(self, n: int) -> None:
        self.bar.advance(self.task, n)

    def close(self) -> None:
        self.bar.stop()


def progress_for(total: int, out: TextIO) -> Progress:
    return RichProgress(total, out) if out.isatty() else PlainProgress(total, out)


# ---- sending ----------------------------------------------------------------------------
class Pacer:
    """At most `rate` sends a second (0: no limit), evenly spaced from the first."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._start: float | None = None
        self._n = 0

    async def wait(self) -> None:
        now = time.monotonic()
        if self._start is None:
            self._start = now
        if self.rate > 0:
            ahead = self._start + self._n / self.rate - now
            if ahead > 0:
                await asyncio.sleep(ahead)  # the rate limit itself
        self._n += 1


@dataclass(frozen=True)
class Options:
    filters: Filters = Filters()
    max_redrives: int = DEFAULT_MAX_REDRIVES
    rate: float = DEFAULT_RATE
    #: Letters per transaction at most (a transaction also ends after MAX_TXN_SECONDS).
    batch: int = DEFAULT_BATCH
    dry_run: bool = False


def transactional_id(settings: Settings) -> str:
    """Fixed per topic prefix: a second redrive of the same DLQ fences the first."""
    return f"{settings.topic_prefix}paysaga-dlq-redrive"


class Sender:
    """Sends planned steps in transactions of up to `batch` letters, each letter's record
    and its ledger record together."""

    def __init__(self, producer: AIOKafkaProducer, topics: Topics, quarantine_partitions: int,
                 options: Options, progress: Progress) -> None:  # fmt: skip
        self.producer, self.topics, self.options = producer, topics, options
        self.quarantine_partitions = quarantine_partitions
        self.progress = progress
        self.pacer = Pacer(options.rate)

    async def send_all(self, steps: Sequence[Step], outcome: Outcome) -> None:
        first = 0  # the first step of the open transaction
        futures: list[asyncio.Future[Any]] = []
        started = 0.0
        try:
            for i, step in enumerate(steps):
                await self.pacer.wait()
                if i == first:
                    await self.producer.begin_transaction()
                    started = time.monotonic()
                futures += await self._send(step)
                full = i + 1 - first >= self.options.batch
                if full or time.monotonic() - started >= MAX_TXN_SECONDS:
                    await self._commit(futures, steps[first : i + 1], outcome)
                    first, futures = i + 1, []
            if first < len(steps):
                await self._commit(futures, steps[first:], outcome)
        except Exception as exc:
            await self._abandon(exc, steps[first:], outcome, futures)

    async def _send(self, step: Step) -> list[asyncio.Future[Any]]:
        letter, at = step.letter, now_ms()
        if step.action is Action.REDRIVE:
            assert step.partition is not None
            topic, part = letter.target, step.partition
            headers = redrive_headers(letter, self.topics.dlq)
        else:
            topic, part = self.topics.dlq_quarantine, letter.partition % self.quarantine_partitions
            headers = quarantine_headers(letter, at)
        sent = await self.producer.send(topic, letter.value, key=letter.key, partition=part,
                                        headers=headers)  # fmt: skip
        entry = ledger_entry(step, topic, part, self.topics.dlq, at)
        noted = await self.producer.send(self.topics.dlq_redrives, entry,
                                         key=letter.ref.encode(), partition=0)  # fmt: skip
        return [sent, noted]

    async def _commit(
        self, futures: list[asyncio.Future[Any]], steps: Sequence[Step], outcome: Outcome
    ) -> None:
        await asyncio.gather(*futures)  # every send acknowledged, or its error raised here
        await self.producer.commit_transaction()
        for s in steps:
            outcome.add(s.action.value, s.letter.kind)
        self.progress.advance(len(steps))

    async def _abandon(
        self, exc: Exception, unsent: Sequence[Step], outcome: Outcome,
        futures: list[asyncio.Future[Any]],
    ) -> None:  # fmt: skip
        """Stop at the first failure: what was not committed counts as failed, and a rerun
        sends it (the ledger does not name it)."""
        for fut in futures:  # their errors are this one: retrieve them, say it once
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        for s in unsent:
            outcome.add(FAILED, s.letter.kind)
        cause = fatal_cause(self.producer, exc)
        if isinstance(cause, FENCED_ERRORS):
            outcome.error = "another redrive of this DLQ took over (fenced); nothing more sent"
            return
        outcome.error = f"{type(cause).__name__}: {cause}"
        # An abort that fails too is harmless: the transaction times out and aborts, and
        # the next run's InitProducerId ends it at once.
        with contextlib.suppress(Exception):
            await self.producer.abort_transaction()


def fatal_cause(producer: AIOKafkaProducer, exc: Exception) -> BaseException:
    """The error that broke the producer, when `exc` is only its consequence.

    Fenced while a send is being prepared, aiokafka's transaction manager turns fatal and
    the next send raises IllegalOperation ("not in transaction"); the fencing itself is
    only kept on the manager's transaction waiter (no public accessor)."""
    manager = getattr(producer, "_txn_manager", None)
    if isinstance(exc, FENCED_ERRORS) or manager is None or not manager.is_fatal_error():
        return exc
    waiter = manager.wait_for_transaction_end()
    if waiter.done() and not waiter.cancelled() and waiter.exception() is not None:
        return waiter.exception()
    return exc


async def partition_counts(bootstrap: str, names: Iterable[str]) -> dict[str, int]:
    """Partition counts of the topics that exist among `names`."""
    wanted = sorted({n for n in names if n})
    if not wanted:
        return {}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        described = await admin.describe_topics(wanted)
    finally:
        await admin.close()
    return {d["topic"]: len(d["partitions"]) for d in described if d.get("error_code", 0) == 0}


def redrive_producer(settings: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(bootstrap_servers=settings.bootstrap,
                            transactional_id=transactional_id(settings), acks="all",
                            enable_idempotence=True, linger_ms=5)  # fmt: skip


async def run_redrive(
    settings: Settings, options: Options, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    """The whole command: 0 when everything meant to be sent was, 1 otherwise."""
    topics = Topics(settings.topic_prefix)
    producer = None if options.dry_run else redrive_producer(settings)
    if producer is not None:
        await producer.start()  # InitProducerId: fences an earlier run, ends its transaction
    try:
        ledger = ledger_of(await read_all(settings.bootstrap, topics.dlq_redrives))
        letters = [letter_of(r) for r in await read_all(settings.bootstrap, topics.dlq)]
        counts = await partition_counts(
            settings.bootstrap, {le.target for le in letters} | {topics.dlq_quarantine}
        )
        steps = plan(letters, options.filters, ledger, counts, options.max_redrives)
        if producer is None:
            render_plan(steps, out)
            return 0
        outcome = Outcome()
        for s in steps:
            if s.action is Action.UNSENDABLE:
                outcome.add(FAILED, s.letter.kind)
                print(f"error: cannot send {s.letter.ref}: no topic {s.letter.target!r}",
                      file=err)  # fmt: skip
            elif s.action not in (Action.REDRIVE, Action.QUARANTINE):
                outcome.add(s.action.value, s.letter.kind)
        work = [s for s in steps if s.action in (Action.REDRIVE, Action.QUARANTINE)]
        if work and counts.get(topics.dlq_quarantine, 0) <= 0:
            raise RuntimeError(f"no topic {topics.dlq_quarantine}: run `paysaga topics create`")
        progress = progress_for(len(work), out)
        try:
            sender = Sender(producer, topics, counts.get(topics.dlq_quarantine, 1), options,
                            progress)  # fmt: skip
            await sender.send_all(work, outcome)
        finally:
            progress.close()
        outcome.render(out, err)
        return 1 if outcome.failed else 0
    finally:
        if producer is not None:
            await producer.stop()
