"""Commit one batch: outputs, changelog records and input offsets in ONE Kafka transaction.

Kafka Streams' RecordCollector and the commit of a StreamTask in one place
(docs/exactly-once.md#one-transaction-per-batch). The order matters and is measured:

1. the input offsets (with the task's stream time as their metadata) go first, on their
   own (docs/traps.md#concurrent-transactions);
2. every output, partitioned by paysaga's murmur2 partitioner (or pinned to a partition);
3. one changelog record per changed key, to the task's partition of each changelog;
4. the commit, after every send was acknowledged;
5. only then the state writes reach RocksDB, with the changelog offset they reflect.
"""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidProducerEpoch,
    InvalidTimestampError,
    MessageSizeTooLargeError,
    ProducerFenced,
    RecordTooLargeError,
)
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata, RecordMetadata, TopicPartition

from paysaga.streams.engine.journal import encode as encode_entry
from paysaga.streams.engine.metrics import COMMIT_SECONDS, flush
from paysaga.streams.engine.partitioner import partition_for
from paysaga.streams.engine.processor import Output
from paysaga.streams.engine.state import EngineState
from paysaga.streams.engine.task import Task, TaskBroken, stream_time_metadata
from paysaga.tables.transaction import TableTransaction, TaskTransaction

#: Broker answers that concern one record, not the transaction: its input becomes poison.
#: InvalidTimestampError: outputs carry their input's event time, and a broker refuses a
#: timestamp further in the future than `message.timestamp.after.max.ms` (1 hour by default
#: since Kafka 3.6): retrying would refuse it forever (docs/traps.md#future-event-times).
RECORD_ERRORS = (MessageSizeTooLargeError, RecordTooLargeError, InvalidTimestampError)
#: The producer's `max_request_size` (aiokafka's default, set explicitly in recovery): a
#: record larger than this can never be sent.
MAX_REQUEST_BYTES = 1_048_576
#: The task now belongs to another producer instance: drop it, never commit again.
FENCED_ERRORS = (ProducerFenced, InvalidProducerEpoch)


async def partitions_of(state: EngineState, producer: AIOKafkaProducer, topic: str) -> int:
    count = state.partition_counts.get(topic)
    if count is None:
        count = len(await producer.partitions_for(topic))
        state.partition_counts[topic] = count
    return count


async def commit(
    state: EngineState,
    task: Task,
    txn: TaskTransaction,
    outputs: list[Output],
    records: list[ConsumerRecord],
    stream_time: int,
    progress: ConsumerRecord | None = None,
) -> None:
    """Commit the batch (see the module docstring); raises what the broker answered.

    `progress`: a replay's journal record, whose offset is the input committed (the
    records themselves belong to the application replayed)."""
    producer = task.producer
    assert producer is not None
    t0 = time.monotonic()
    await producer.begin_transaction()
    last: dict[tuple[str, int], int] = {}
    for r in records if progress is None else [progress]:  # in offset order: the last wins
        last[(r.topic, r.partition)] = r.offset
    meta = stream_time_metadata(stream_time)
    offsets = {TopicPartition(t, p): OffsetAndMetadata(o + 1, meta) for (t, p), o in last.items()}
    # Offsets first, and on their own. A transaction's first request to the coordinator
    # often arrives while the previous transaction's markers are still being written and
    # gets CONCURRENT_TRANSACTIONS; aiokafka retries a first AddPartitionsToTxn after a fixed
    # 20 ms but AddOffsetsToTxn after `retry_backoff_ms`. With AddOffsetsToTxn in flight
    # beside produce requests, the broker's per-partition verification (KIP-890) answers
    # with a retried NotEnoughReplicasError. The order changes nothing else: offsets and
    # outputs become visible together at the commit, or never.
    if offsets:  # a punctuation has no input offsets
        await producer.send_offsets_to_transaction(offsets, state.config.group)
    t1 = time.monotonic()
    batches = _Batches(producer)
    replay = state.config.replay
    if replay is not None and replay.rebuild:
        outputs = []  # a reset's rebuild: the live outputs exist already (config.py)
    for topic, key, value, headers, index, ts, pinned in outputs:
        if pinned is not None:
            part = pinned
        else:
            n = await partitions_of(state, producer, topic)
            part = partition_for(key, n) if key is not None else index % n
        batches.add(topic, part, key, value, headers, ts, index)
    journal = state.config.journal_topic
    if journal is not None:  # what this transaction processed, for a replay
        positions = {name: at for name, store in task.stores.items()
                     if (at := store.changelog_offset()) is not None}  # fmt: skip
        entry = encode_entry(task.attempt_now, stream_time, records, task.poison,
                             task.attempt_ticked, positions, task.attempt_decoded)  # fmt: skip
        batches.add(journal, task.partition, None, entry, None, task.attempt_now, None)
    changelog: list[tuple[str, TableTransaction, TopicPartition]] = []
    for name, table_txn in txn.changed():
        tp = TopicPartition(state.config.changelog(name), task.partition)
        for key, value in table_txn.changes.items():
            batches.add(tp.topic, tp.partition, key, value, None, None, None)
        changelog.append((name, table_txn, tp))
    last_offsets = await batches.send()
    t2 = time.monotonic()
    await producer.commit_transaction()
    t3 = time.monotonic()
    # Committed: its figures stand whatever happens next (a local write failing below
    # rebuilds the task, and must not lose them).
    flush(task.pending_metrics, state.metrics)
    st = state.stats
    st["offsets_seconds"] += t1 - t0
    st["send_seconds"] += t2 - t1
    st["commit_seconds"] += t3 - t2
    state.metrics.observe(COMMIT_SECONDS, (), t3 - t0)
    # Committed: now (and only now) the local state may reflect the batch.
    for name, table_txn, tp in changelog:
        task.stores[name].apply(table_txn.changes, last_offsets[tp])
    settle(state, task, records, stream_time, progress)


class _Batches:
    """A transaction's records, one producer batch per topic-partition (Kafka Streams'
    RecordCollector): aiokafka's `send()` costs about 20 µs a record in Python (metadata
    lookups that build a set of partitions, twice, a future per record), a batch append a
    few. Each batch remembers which inputs caused its records, so a batch the broker
    refuses makes exactly those inputs suspects (`TaskRunner._process_task`)."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer
        #: Per topic-partition, in order: (builder, owning input indexes) of each batch.
        self.open: dict[TopicPartition, list[tuple[BatchBuilder, list[int]]]] = {}

    def add(self, topic: str, part: int, key: bytes | None, value: bytes | None,
            headers: list[tuple[str, bytes]] | None, ts: int | None,
            owner: int | None) -> None:  # fmt: skip
        headers = headers or []
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)
        if size > MAX_REQUEST_BYTES:  # as `send()` refuses it: before anything is sent
            exc = MessageSizeTooLargeError(f"a {size}-byte record exceeds {MAX_REQUEST_BYTES}")
            if owner is not None:  # a changelog record has no one input to blame
                exc.paysaga_records = {owner}
            raise exc
        tp = TopicPartition(topic, part)
        chain = self.open.get(tp)
        if chain is None:
            chain = self.open[tp] = [(self.producer.create_batch(), [])]
        builder, owners = chain[-1]
        if builder.append(key=key, value=value, timestamp=ts, headers=headers) is None:
            builder, owners = self.producer.create_batch(), []
            chain.append((builder, owners))  # full: the next batch of this partition
            if builder.append(key=key, value=value, timestamp=ts, headers=headers) is None:
                raise TaskBroken(f"a {size}-byte record does not fit an empty batch")
        if owner is not None:
            owners.append(owner)

    async def send(self) -> dict[TopicPartition, int]:
        """Send every batch and wait for the broker; the offset of each topic-partition's
        last record. A refused batch raises, with its inputs as `paysaga_records` when
        every refusal concerns records only."""
        sent: list[tuple[TopicPartition, int, list[int], asyncio.Future[RecordMetadata]]] = []
        for tp, chain in self.open.items():
            for builder, owners in chain:
                count = builder.record_count()
                fut = await self.producer.send_batch(builder, tp.topic, partition=tp.partition)
                sent.append((tp, count, owners, fut))
        results = await asyncio.gather(*(f for *_, f in sent), return_exceptions=True)
        errors = [(owners, r) for (_, _, owners, _), r in zip(sent, results, strict=True)
                  if isinstance(r, BaseException)]  # fmt: skip
        if errors:
            first_error = errors[0][1]
            if all(isinstance(e, RECORD_ERRORS) and owners for owners, e in errors):
                # Every input with a record in a refused batch is a suspect.
                first_error.paysaga_records = {i for owners, _ in errors for i in owners}  # type: ignore[attr-defined]
            raise first_error
        last: dict[TopicPartition, int] = {}
        for (tp, count, _, _), meta in zip(sent, results, strict=True):
            assert isinstance(meta, RecordMetadata)
            last[tp] = meta.offset + count - 1  # a batch's offsets are consecutive
        return last


def settle(state: EngineState, task: Task, records: list[ConsumerRecord], stream_time: int,
           progress: ConsumerRecord | None = None) -> None:  # fmt: skip
    """What a task knows once a batch committed: next offsets, stream time, no poison."""
    for r in records if progress is None else [progress]:
        task.next_offsets[TopicPartition(r.topic, r.partition)] = r.offset + 1
    task.stream_time = max(task.stream_time, stream_time)
    if task.poison:
        for r in records:
            task.poison.pop((r.topic, r.partition, r.offset), None)
    task.committed_batches += 1
    state.stats["records"] += len(records)
    state.stats["batches"] += 1


async def abort(task: Task) -> None:
    """Abort the open transaction. Fenced errors propagate; any other failure means the
    producer cannot be trusted any more, and the task is rebuilt."""
    assert task.producer is not None
    try:
        await task.producer.abort_transaction()
    except FENCED_ERRORS:
        raise
    except Exception as exc:
        raise TaskBroken(f"abort failed: {exc!r}") from exc
