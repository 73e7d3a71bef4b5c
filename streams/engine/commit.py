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
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata, TopicPartition

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
) -> None:
    """Commit the batch (see the module docstring); raises what the broker answered."""
    producer = task.producer
    assert producer is not None
    t0 = time.monotonic()
    await producer.begin_transaction()
    last: dict[tuple[str, int], int] = {}
    for r in records:  # each partition's records are in offset order: the last wins
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
    futures: list[asyncio.Future[object]] = []
    owners: list[int] = []
    for topic, key, value, headers, index, ts, pinned in outputs:
        if pinned is not None:
            part = pinned
        else:
            n = await partitions_of(state, producer, topic)
            part = partition_for(key, n) if key is not None else index % n
        try:
            fut = await producer.send(topic, value, key=key, partition=part, headers=headers,
                                      timestamp_ms=ts)  # fmt: skip
        except RECORD_ERRORS as exc:  # refused before sending (e.g. over max_request_size)
            exc.paysaga_records = {index}
            raise
        futures.append(fut)
        owners.append(index)
    changelog: list[tuple[str, TableTransaction, int]] = []
    for name, table_txn in txn.changed():
        topic = state.config.changelog(name)
        first = len(futures)
        for key, value in table_txn.changes.items():
            futures.append(await producer.send(topic, value, key=key, partition=task.partition))
        changelog.append((name, table_txn, first))
    results = await asyncio.gather(*futures, return_exceptions=True)
    errors = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
    if errors:
        first_error = errors[0][1]
        if all(isinstance(e, RECORD_ERRORS) and i < len(owners) for i, e in errors):
            # All inputs whose outputs shared a refused producer batch are suspects.
            first_error.paysaga_records = {owners[i] for i, _ in errors}  # type: ignore[attr-defined]
        raise first_error
    t2 = time.monotonic()
    await producer.commit_transaction()
    t3 = time.monotonic()
    st = state.stats
    st["offsets_seconds"] += t1 - t0
    st["send_seconds"] += t2 - t1
    st["commit_seconds"] += t3 - t2
    # Committed: now (and only now) the local state may reflect the batch.
    for name, table_txn, first in changelog:
        ack = results[first + len(table_txn.changes) - 1]
        task.stores[name].apply(table_txn.changes, ack.offset)  # type: ignore[attr-defined]
    settle(state, task, records, stream_time)


def settle(state: EngineState, task: Task, records: list[ConsumerRecord], stream_time: int) -> None:
    """What a task knows once a batch committed: next offsets, stream time, no poison."""
    for r in records:
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
