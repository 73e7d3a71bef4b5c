"""The task journal: what each committed transaction processed, so a replay re-executes it
(docs/replay.md#the-journal).

A task's processing depends on more than its input records: on how they were cut into
batches and merged across the task's partitions, on the wall clock it read (a command's
deadline, the breaker's wait), on which wall-clock schedules ran, and on inputs it sent to
the DLQ because the broker refused their outputs. None of that is in the input topics. So
every transaction of a task writes one journal entry to its partition of the journal
topic, inside the same transaction: the input offset ranges in the order they were merged,
the wall clock of the batch, the schedules a punctuation ran, the poison it applied. A
replay reads the journal as its only input and, entry by entry, fetches exactly those
records and runs the same agents with the same clock, so it reproduces every output and
every table value (the engine's code being deterministic given its inputs and clock).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord, TopicPartition

VERSION = 1
#: (topic, partition, first offset, last offset) of one input partition in a batch.
Range = tuple[str, int, int, int]
#: (topic, partition, offset, kind, reason): a dead letter the batch wrote for an input
#: instead of running the agents on it.
Poison = tuple[str, int, int, str, str]


@dataclass(frozen=True)
class Entry:
    """One committed transaction of a task, as its journal record says."""

    now: int
    stream_time: int
    #: Input ranges, in the order their lists were merged.
    inputs: tuple[Range, ...] = ()
    #: The merge: runs of (index into `inputs`, count), in processing order.
    order: tuple[tuple[int, int], ...] = ()
    poison: tuple[Poison, ...] = ()
    #: A wall-clock punctuation: the schedules it ran (None: a batch of inputs).
    ticked: tuple[str, ...] | None = None
    #: Per table, the task's changelog offset before this transaction: where the live
    #: table stood, for a replay's comparison (`--verify`).
    changelog: tuple[tuple[str, int], ...] = ()
    #: Inputs whose decoding an agent refused (a dead letter each); None in entries
    #: written before the journal kept them (then nobody knows).
    decoded: tuple[tuple[str, int, int], ...] | None = None

    @property
    def records(self) -> int:
        return sum(n for _, n in self.order)


def encode(
    now: int,
    stream_time: int,
    records: Sequence[ConsumerRecord],
    poison: Mapping[tuple[str, int, int], tuple[str, str, int]],
    ticked: Sequence[str] | None,
    changelog: Mapping[str, int] | None = None,
    decoded: Sequence[tuple[str, int, int]] = (),
) -> bytes:
    """The journal value of a transaction over `records` (in processing order)."""
    index: dict[tuple[str, int], int] = {}
    ranges: list[list[Any]] = []
    order: list[list[int]] = []
    marks: list[list[Any]] = []
    for r in records:
        tp = (r.topic, r.partition)
        i = index.get(tp)
        if i is None:
            i = index[tp] = len(ranges)
            ranges.append([r.topic, r.partition, r.offset, r.offset])
        else:
            ranges[i][3] = r.offset
        if order and order[-1][0] == i:
            order[-1][1] += 1
        else:
            order.append([i, 1])
        if poison:
            mark = poison.get((r.topic, r.partition, r.offset))
            if mark is not None:
                marks.append([r.topic, r.partition, r.offset, mark[0], mark[1]])
    doc: dict[str, Any] = {"v": VERSION, "w": now, "st": stream_time}
    if ranges:
        # The merge order always: a range's span counts transaction markers too, so it
        # does not say how many records the batch took from it.
        doc["in"], doc["o"] = ranges, order
    if marks:
        doc["p"] = marks
    if ticked is not None:
        doc["t"] = list(ticked)
    if changelog:
        doc["cl"] = dict(changelog)
    doc["dl"] = [list(d) for d in dict.fromkeys(decoded)]  # always: none is a fact too
    return json.dumps(doc, separators=(",", ":")).encode()


class JournalError(ValueError):
    """A journal record this engine cannot replay (another version, or not a journal)."""


def decode(raw: bytes | None) -> Entry:
    try:
        doc = json.loads(raw or b"")
        if doc.get("v") != VERSION:
            raise JournalError(f"journal version {doc.get('v')!r}, this engine reads {VERSION}")
        inputs = tuple((str(t), int(p), int(a), int(b)) for t, p, a, b in doc.get("in", ()))
        order = tuple((int(i), int(n)) for i, n in doc.get("o", ()))
        if inputs and not order:
            raise JournalError("a journal entry with inputs and no merge order")
        poison = tuple((str(t), int(p), int(o), str(k), str(r)) for t, p, o, k, r
                       in doc.get("p", ()))  # fmt: skip
        raw_ticked = doc.get("t")
        ticked = None if raw_ticked is None else tuple(str(x) for x in raw_ticked)
        changelog = tuple((str(k), int(v)) for k, v in doc.get("cl", {}).items())
        raw_decoded = doc.get("dl")
        decoded = None if raw_decoded is None else tuple(
            (str(t), int(p), int(o)) for t, p, o in raw_decoded)  # fmt: skip
        return Entry(int(doc["w"]), int(doc["st"]), inputs, order, poison, ticked, changelog,
                     decoded)  # fmt: skip
    except JournalError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise JournalError(f"not a journal record: {exc}") from None


class RangeReader:
    """Reads the committed records of given offset ranges, for one task of a replay.

    Its consumer (group-less, read_committed) reads each assigned partition forward; a
    task's journal entries take each partition's offsets in increasing order, so after
    the first seek every record is read once, in order, and kept until an entry takes it.
    Offsets that hold no committed record (transaction markers, aborted records) are
    skipped, as a read_committed reader skips them live.
    """

    def __init__(self, bootstrap: str, rename: Mapping[str, str]) -> None:
        self.bootstrap = bootstrap
        #: Topic names as the live application read them -> as this replay's agents know
        #: them (its own internal topics carry its own prefix).
        self.rename = dict(rename)
        self._consumer: AIOKafkaConsumer | None = None
        self._buffers: dict[TopicPartition, list[ConsumerRecord]] = {}
        self._wanted: dict[TopicPartition, int] = {}

    async def _client(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            c = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                 isolation_level="read_committed", auto_offset_reset="earliest",
                                 fetch_max_wait_ms=5)  # fmt: skip
            await c.start()
            self._consumer = c
        return self._consumer

    async def batch(self, entry: Entry, timeout_s: float = 60.0) -> list[ConsumerRecord]:
        """The entry's records, merged in the order the live batch processed them."""
        lists = [await self._take(TopicPartition(t, p), first, last, timeout_s)
                 for t, p, first, last in entry.inputs]  # fmt: skip
        out: list[ConsumerRecord] = []
        at = [0] * len(lists)
        for i, n in entry.order:
            out.extend(lists[i][at[i] : at[i] + n])
            at[i] += n
        if any(at[i] != len(lists[i]) for i in range(len(lists))):
            got = [len(x) for x in lists]
            raise JournalError(f"the journal's merge order ({at}) does not match the records "
                               f"found in its ranges {list(entry.inputs)} ({got})")  # fmt: skip
        return out

    async def _take(self, tp: TopicPartition, first: int, last: int,
                    timeout_s: float) -> list[ConsumerRecord]:  # fmt: skip
        c = await self._client()
        buf = self._buffers.setdefault(tp, [])
        while buf and buf[0].offset < first:
            buf.pop(0)
        if tp not in self._wanted or (not buf and self._wanted[tp] > first) or (
                buf and buf[0].offset > first):  # fmt: skip
            await self._seek(c, tp, first)
            buf = self._buffers[tp]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not buf or buf[-1].offset < last:
            position = await c.position(tp)
            if position > last and (not buf or buf[-1].offset <= last):
                break  # the rest of the range holds no committed record
            if loop.time() > deadline:
                raise TimeoutError(f"{tp.topic}[{tp.partition}] offsets {first}-{last} did "
                                   f"not arrive in {timeout_s}s")  # fmt: skip
            fetched = await c.getmany(timeout_ms=100, max_records=5000)
            for got_tp, records in fetched.items():
                kept = self._buffers.setdefault(got_tp, [])
                after = kept[-1].offset if kept else self._wanted.get(got_tp, 0) - 1
                kept.extend(r for r in records if r.offset > after)
            buf = self._buffers[tp]
        n = 0
        while n < len(buf) and buf[n].offset <= last:
            n += 1
        taken, self._buffers[tp] = buf[:n], buf[n:]
        self._wanted[tp] = last + 1
        name = self.rename.get(tp.topic)
        if name is not None:
            taken = [replace(r, topic=name) for r in taken]
        return taken

    async def _seek(self, c: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> None:
        if tp not in c.assignment():
            # A new assignment forgets every position: put the others back where they were.
            others = {o: (b[-1].offset + 1 if (b := self._buffers.get(o)) else self._wanted[o])
                      for o in c.assignment()}  # fmt: skip
            c.assign([*others, tp])
            for o, at in others.items():
                c.seek(o, at)
        c.seek(tp, offset)
        self._buffers[tp] = []
        self._wanted[tp] = offset

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
