"""The benchmark's comparison pipelines, each run as its own process by `paysaga bench`.

Both do paysaga's intake work per event (Avro decode, pydantic validation, payment state
get/put in RocksDB with a changelog record, a PaymentStatusChanged output) by calling the
same `IntakeStep`, so the difference measured is the processing path, not the logic:

- `baseline`: a minimal hand-written aiokafka consume-transform-produce loop, one
  transaction per fetched batch (the baseline of docs/exactly-once.md#how-it-is-measured).
- `faust`: the textbook Faust agent (`table[k] = v; await topic.send(...)`) under Faust's own
  `processing_guarantee="exactly_once"`.
- `intake_topology`: the same step on paysaga's engine (a `paysaga worker` with
  `PAYSAGA_TOPOLOGY=paysaga.streams.dev.bench_pipelines:intake_topology`). The full payment
  topology does more per request (idempotency stage, saga, commands), so the benchmark
  keeps this like-for-like intake for its ratios.

Usage: python -m paysaga.streams.dev.bench_pipelines {baseline|faust} BOOTSTRAP INPUT OUTPUT
GROUP STATE_DIR PARTITIONS
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from paysaga.agents.intake import IntakeStep, Rejected
from paysaga.agents.outputs import compact_json
from paysaga.schemas.codec import AvroCodec
from paysaga.schemas.models import PaymentInitiated
from paysaga.schemas.registry import SchemaRegistry
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import Topics
from paysaga.streams.engine import ProcessorContext, Topology
from paysaga.streams.engine.partitioner import partition_for
from paysaga.tables.payments import PAYMENTS

_dumps = json.JSONEncoder(separators=(",", ":")).encode


async def baseline(bootstrap: str, source: str, output: str, group: str, state: Path) -> None:
    import rocksdict
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.structs import OffsetAndMetadata

    step = IntakeStep(AvroCodec(SchemaRegistry()))
    changelog = f"{group}-changelog"
    consumer = AIOKafkaConsumer(
        source, bootstrap_servers=bootstrap, group_id=group, isolation_level="read_committed",
        enable_auto_commit=False, auto_offset_reset="earliest", fetch_max_wait_ms=20,
    )  # fmt: skip
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, transactional_id=f"{group}-txn", enable_idempotence=True,
        acks="all", linger_ms=5, max_batch_size=256 * 1024,
    )  # fmt: skip
    state.mkdir(parents=True, exist_ok=True)
    db = rocksdict.Rdict(str(state / "db"), rocksdict.Options(raw_mode=True))
    no_wal = rocksdict.WriteOptions()
    # A property at run time; rocksdict's stub declares it a method (calling it fails).
    no_wal.disable_wal = True  # type: ignore[method-assign, assignment]
    await consumer.start()
    await producer.start()
    print("READY", flush=True)
    while True:
        batch = await consumer.getmany(timeout_ms=100, max_records=2000)
        if not batch:
            continue
        await producer.begin_transaction()
        futures: list[Any] = []  # aiokafka's send futures (untyped)
        writes: dict[bytes, bytes] = {}
        for tp, records in batch.items():
            for r in records:
                parsed = step.parse(r.value)
                if isinstance(parsed, Rejected):
                    continue
                key = parsed.payment_id.encode()
                current = writes.get(key) or db.get(key)
                out = step.apply(parsed, None if current is None else json.loads(current))
                if out.store is not None:
                    value = _dumps(out.store).encode()
                    writes[key] = value
                    futures.append(
                        await producer.send(changelog, value, key=key, partition=tp.partition)
                    )
                futures.append(await producer.send(output, out.status, key=key))
        await asyncio.gather(*futures)
        offsets = {tp: OffsetAndMetadata(rs[-1].offset + 1, "") for tp, rs in batch.items()}
        await producer.send_offsets_to_transaction(offsets, group)
        await producer.commit_transaction()
        wb = rocksdict.WriteBatch(raw_mode=True)
        for key, value in writes.items():
            wb.put(key, value)
        db.write(wb, no_wal)


def faust_textbook(
    bootstrap: str, source: str, output: str, group: str, state: Path, partitions: int
) -> None:
    import faust

    from paysaga.streams.app.worker import PaysagaWorker

    step = IntakeStep(AvroCodec(SchemaRegistry()))
    state.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        group, broker=f"kafka://{bootstrap}", store="rocksdb://", datadir=str(state),
        processing_guarantee="exactly_once", topic_partitions=partitions,
        topic_replication_factor=1, web_enabled=False, autodiscover=False,
        consumer_auto_offset_reset="earliest", key_serializer="raw", value_serializer="raw",
    )  # fmt: skip
    table = app.Table("payments", default=None, key_type=bytes, partitions=partitions)
    src = app.topic(source, key_type=bytes, value_type=bytes)
    out_topic = app.topic(output, key_type=bytes, value_type=bytes)

    @app.agent(src)
    async def intake(stream: faust.StreamT[bytes]) -> None:  # the textbook pattern
        async for value in stream:
            parsed = step.parse(value)
            if isinstance(parsed, Rejected):
                continue
            key = parsed.payment_id.encode()
            out = step.apply(parsed, table.get(key))
            if out.store is not None:
                table[key] = out.store
            await out_topic.send(key=key, value=out.status)

    @app.task
    async def announce() -> None:
        print("READY", flush=True)

    PaysagaWorker(app, loglevel="WARNING", quiet=True).execute_from_commandline()


def intake_topology(settings: Settings) -> Topology:
    """paysaga's engine running the same single-hop intake as the two pipelines above:
    decode, validate, payment lookup and write, one status record (no saga after it)."""
    names = Topics(settings.topic_prefix)
    step = IntakeStep(AvroCodec(SchemaRegistry()))
    topology = Topology()

    @topology.agent("bench.intake", sources=[names.initiated, names.initiated_repartition],
                    tables=[PAYMENTS], decode=step.decode,
                    event_time=lambda event: event.occurred_at)  # fmt: skip
    def intake(ctx: ProcessorContext, event: PaymentInitiated) -> None:
        record = ctx.record
        assert record is not None
        key = event.payment_id.encode()
        if partition_for(key, settings.partitions) != record.partition:
            ctx.send(names.initiated_repartition, key, record.value, list(record.headers or ()))
            return
        payments = ctx.table(PAYMENTS)
        current = payments.get(key)
        out = step.apply(event, None if current is None else json.loads(current))
        if out.store is not None:
            payments.set(key, compact_json(out.store))
        ctx.send(names.status, key, out.status)

    return topology


def main(argv: list[str]) -> None:
    kind, bootstrap, source, output, group, state, partitions = argv
    if kind == "baseline":
        asyncio.run(baseline(bootstrap, source, output, group, Path(state)))
    else:
        faust_textbook(bootstrap, source, output, group, Path(state), int(partitions))


if __name__ == "__main__":
    main(sys.argv[1:])
