"""Exactly-once, proven with SIGKILL: the engine's contract through a real broker.

The fold pipeline (tests/pipelines.py) runs in real worker processes that are killed with
SIGKILL at random moments while batches are in flight. Afterwards, reading committed records
only: every input yields exactly one record on each output topic, the per-key running totals
are exactly the fold of the inputs, and the changelog and the local RocksDB stores agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import random
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition

from paysaga.streams.app.kafka_io import read_all
from paysaga.streams.app.net import free_port
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import Topics, changelog_topic
from paysaga.streams.dev.broker import LocalBroker
from paysaga.streams.engine.deadletter import H_KIND, H_REASON, parse_headers
from paysaga.tables.store import StoreManager
from tests import pipelines
from tests.support import (
    PacedProducer,
    WorkerProcess,
    isolated_settings,
    kill_repeatedly,
    wait_for,
)

KEYS = 40


def _settings(broker: LocalBroker, tmp_path: Path, name: str, **kw) -> Settings:
    kw.setdefault("topology", "tests.pipelines:fold_topology")
    return isolated_settings(broker.bootstrap, tmp_path / "state", name, app_id=f"eos-{name}",
                             **kw)  # fmt: skip


def _inputs(n: int, seed: int) -> list[tuple[bytes, dict]]:
    rng = random.Random(seed)
    return [(f"k{rng.randrange(KEYS)}".encode(), {"seq": i, "amount": rng.randint(1, 10_000)})
            for i in range(n)]  # fmt: skip


def _committed(settings: Settings, topic: str) -> list:
    return asyncio.run(read_all(settings.bootstrap, topic))


def _count(settings: Settings, topic: str) -> int:
    return len(_committed(settings, topic))


def _verify(settings: Settings, inputs: list[tuple[bytes, dict]], dead: set[int]) -> None:
    """Exactly one output per good input on both topics; totals are the exact fold."""
    _, out_a, out_b = pipelines.names(settings)
    good = [(k, v) for k, v in inputs if v["seq"] not in dead]
    for topic in (out_a, out_b):
        outs = [json.loads(r.value) for r in _committed(settings, topic)]
        seqs = Counter(o["seq"] for o in outs)
        twice = [s for s, n in seqs.items() if n > 1]
        missing = {v["seq"] for _, v in good} - set(seqs)
        assert not twice, f"{topic}: {len(twice)} inputs produced twice, e.g. {twice[:5]}"
        assert not missing, f"{topic}: {len(missing)} inputs lost, e.g. {sorted(missing)[:5]}"
        assert len(outs) == len(good)

    # Per key, in input order, the outputs carry the exact running fold.
    expected: dict[str, list[tuple[int, int]]] = defaultdict(list)
    totals: dict[bytes, tuple[int, int]] = {}
    for key, v in good:
        t, c = totals.get(key, (0, 0))
        totals[key] = (t + v["amount"], c + 1)
        expected[key.decode()].append(totals[key])
    got: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for r in _committed(settings, out_a):
        o = json.loads(r.value)
        got[o["key"]].append((o["total"], o["count"]))
    assert dict(got) == dict(expected)

    # The changelog (committed, last value per key) equals the fold ...
    changelog = {}
    for r in _committed(settings, changelog_topic(settings, pipelines.TOTALS)):
        changelog[r.key] = tuple(json.loads(r.value))
    assert changelog == totals
    # ... and so do the local RocksDB stores once the workers are gone.
    manager = StoreManager(settings.data_dir / settings.app_id / "state")
    local = {}
    for p in range(settings.partitions):
        if manager.path(pipelines.TOTALS, p).exists():
            store = manager.open(pipelines.TOTALS, p)
            local.update({k: tuple(json.loads(v)) for k, v in store.items()})
            store.close()
    assert local == totals


@contextlib.asynccontextmanager
async def _admin(settings: Settings):
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


async def _group_offsets(settings: Settings) -> dict[int, int]:
    """The worker group's committed offset of each input partition (inputs consumed)."""
    async with _admin(settings) as admin:
        offsets = await admin.list_consumer_group_offsets(settings.app_id)
    source = pipelines.names(settings)[0]
    return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == source}


def _consumed(settings: Settings) -> int:
    """How many inputs the worker's group has committed."""
    return sum(asyncio.run(_group_offsets(settings)).values())


@pytest.mark.slow
def test_kill9_during_batches(broker: LocalBroker, tmp_path: Path) -> None:
    # A shorter session: each restart waits that long for its killed self to leave the group.
    # A commit interval, so kills also land while a task waits to gather its next batch and
    # while fetches are held (the other kill tests run without one, the default).
    settings = _settings(broker, tmp_path, "kill", max_batch=50, session_timeout_ms=6000,
                         engine_commit_interval_ms=100)  # fmt: skip
    pipelines.create_topics(settings)
    # Inputs keep arriving until the last kill (the list only bounds the test): a worker that
    # caught up with a finished load would leave nothing in flight to crash into.
    inputs = _inputs(200_000, seed=3)  # 400 s at 500/s: far more than the kills take
    producer = PacedProducer(
        settings,
        pipelines.names(settings)[0],
        [(k, json.dumps(v).encode()) for k, v in inputs],
        500,
    )
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    producer.start()
    out_a = pipelines.names(settings)[1]
    try:
        recovering = kill_repeatedly(worker, 6, lambda: _consumed(settings), 300, producer,
                                     random.Random(9))  # fmt: skip
        producer.stop()
        producer.join(30)
        assert producer.error is None and not producer.is_alive()
        inputs = inputs[: producer.sent]
        wait_for(lambda: _count(settings, out_a) >= len(inputs), 120, what="all outputs")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; {worker.diagnosis()}") from None
    finally:
        worker.stop()
    print(f"\nkill -9 test: {len(inputs)} inputs, 6 kills during batches and {recovering} "
          "during recovery, outputs verified")  # fmt: skip
    _verify(settings, inputs, dead=set())


@pytest.mark.slow
def test_two_workers_one_killed(broker: LocalBroker, tmp_path: Path) -> None:
    base = _settings(broker, tmp_path, "pair", max_batch=50, session_timeout_ms=6000)
    pipelines.create_topics(base)
    inputs = _inputs(8_000, seed=5)
    producer = PacedProducer(
        base, pipelines.names(base)[0], [(k, json.dumps(v).encode()) for k, v in inputs], 1000
    )
    a = WorkerProcess(base, tmp_path / "a.log").start()
    b_settings = base.model_copy(update={"web_port": free_port(), "data_dir": tmp_path / "b"})
    b = WorkerProcess(b_settings, tmp_path / "b.log").start()
    out_a = pipelines.names(base)[1]
    try:
        wait_for(lambda: a.get("/ready/")[1]["tasks"] and b.get("/ready/")[1]["tasks"], 60,
                 what="both workers own tasks")  # fmt: skip
        producer.start()
        wait_for(lambda: _count(base, out_a) > 2000, 60, what="progress with two workers")
        assert b.get("/ready/")[1]["tasks"], "the second worker owned no task before the kill"
        b.kill()
        wait_for(lambda: a.get("/ready/")[1]["tasks"] == [0, 1, 2], 90,
                 what="survivor owns every task")  # fmt: skip
        producer.join(120)
        assert producer.error is None
        wait_for(lambda: _count(base, out_a) >= len(inputs), 120, what="all outputs")
    finally:
        a.stop()
    # The killed worker's local state is stale by design; verify against the survivor's.
    _verify(base, inputs, dead=set())


def test_failing_record_aborts_batch_and_goes_to_dlq(broker: LocalBroker, tmp_path: Path) -> None:
    settings = _settings(broker, tmp_path, "poison", max_batch=500)
    pipelines.create_topics(settings)
    inputs = _inputs(600, seed=8)
    raw = [(k, json.dumps(v).encode()) for k, v in inputs]
    poison_seq, huge_seq = 150, 400
    raw[poison_seq] = (raw[poison_seq][0], b"POISON")
    raw[huge_seq] = (raw[huge_seq][0], json.dumps({**inputs[huge_seq][1], "huge": True}).encode())
    producer = PacedProducer(settings, pipelines.names(settings)[0], raw, 100_000)
    producer.run()  # all inputs first, so they share batches
    assert producer.error is None
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    _, out_a, _ = pipelines.names(settings)
    dlq = Topics(settings.topic_prefix).dlq
    try:
        wait_for(lambda: _count(settings, out_a) >= 598, 90, what="all good outputs")
        letters = wait_for(lambda: _committed(settings, dlq), 30, what="dead letters")
    finally:
        worker.stop()
    assert len(letters) == 2
    by_value = {r.value: parse_headers(r.headers) for r in letters}
    assert by_value[b"POISON"][H_KIND] == "poison"
    assert "ValueError" in by_value[b"POISON"][H_REASON]
    assert "MessageSizeTooLarge" in by_value[raw[huge_seq][1]][H_REASON]
    _verify(settings, inputs, dead={poison_seq, huge_seq})
    # The oversized output is refused before any record of its transaction is sent
    # (commit._Batches checks every record's size first), so the aborted attempt wrote
    # nothing: a read_uncommitted reader sees exactly what a read_committed one does.
    uncommitted = asyncio.run(read_all(settings.bootstrap, out_a, isolation="read_uncommitted"))
    assert len(uncommitted) == _count(settings, out_a)


class GatedFetch:
    """Holds the engine's next `getmany()` at a gate, so an assignment can run meanwhile.

    The real consumer does every fetch; the gate only decides *when*, which turns the race a
    kill test hits by chance into a fixed interleaving: the fetch loop has taken its
    generation and is inside `getmany()` while the partitions are revoked and assigned again.
    Once opened, the held call fetches until it has records, i.e. records read after the
    new assignment's seek to committed, exactly what a fetch in flight returns in the race.
    """

    def __init__(self, consumer) -> None:
        self.real = consumer.getmany
        self.armed = False
        self.calls = 0
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()
        self.returned: dict = {}
        #: The partitions the held call fetches (default: what the caller asked for).
        self.only: tuple[TopicPartition, ...] = ()

    async def __call__(self, *tps, timeout_ms: int = 0, max_records: int | None = None):
        if not self.armed:
            batch = await self.real(*tps, timeout_ms=timeout_ms, max_records=max_records)
            self.calls += 1
            return batch
        self.armed = False
        self.calls = 0
        self.entered.set()
        await self.gate.wait()
        deadline = asyncio.get_running_loop().time() + 30
        while not self.returned and asyncio.get_running_loop().time() < deadline:
            self.returned = await self.real(*(self.only or tps), timeout_ms=timeout_ms,
                                            max_records=max_records)  # fmt: skip
        return self.returned


async def _send(settings: Settings, items: list[tuple[bytes, dict]]) -> list[int]:
    """Produce the fold inputs; returns the input partition each one landed on."""
    source = pipelines.names(settings)[0]
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all")
    await producer.start()
    try:
        futures = [await producer.send(source, json.dumps(value).encode(), key=key)
                   for key, value in items]  # fmt: skip
        return [(await f).partition for f in futures]
    finally:
        await producer.stop()


def _output_count(settings: Settings):
    """An async probe: how many inputs are visible (committed) on both output topics now.

    Both, because a transaction's markers reach its partitions one by one: a reader can see
    a commit on one topic a moment before the other.
    """
    _, out_a, out_b = pipelines.names(settings)

    async def count() -> int:
        a, b = await asyncio.gather(read_all(settings.bootstrap, out_a),
                                    read_all(settings.bootstrap, out_b))  # fmt: skip
        return min(len(a), len(b))

    return count


async def _until(probe, timeout: float, what: str):
    """Await `probe()` (sync or async) until truthy; fail with `what` after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        found = probe()
        if asyncio.iscoroutine(found):
            found = await found
        if found:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def _at_least(count, n: int) -> bool:
    return await count() >= n


def test_fetch_in_flight_across_reassignment_is_read_again(
    broker: LocalBroker, tmp_path: Path
) -> None:
    """The race behind two liveness failures of the kill tests, reproduced on purpose.

    A `getmany()` in flight while the partitions are revoked and assigned again returns
    records fetched after the seek to committed. The engine must not process them (they
    belong to an older generation) and must not lose them either: aiokafka has already moved
    past them, so without reading them again the worker would stall, or a later batch would
    commit past them. Every input must come out exactly once. (With `_refetch` disabled this
    test times out at its last wait; so does the first wait if inputs arrive while the very
    first fetch, which runs the first assignment, is still in flight.)
    """
    from paysaga.streams.app.assembly import create_engine

    settings = _settings(broker, tmp_path, "refetch", max_batch=50)
    pipelines.create_topics(settings)
    inputs = _inputs(300, seed=11)
    before, after = inputs[:100], inputs[100:]
    outputs = _output_count(settings)
    send = functools.partial(_send, settings)

    async def scenario() -> dict[str, float]:
        engine = create_engine(settings)
        await engine.start()
        try:
            assert engine.consumer is not None
            fetch = GatedFetch(engine.consumer)
            engine.consumer.getmany = fetch
            await _until(lambda: engine.ready and sorted(engine.tasks) == [0, 1, 2], 60,
                         "the engine owns every task")  # fmt: skip
            # The first assignment itself happens inside a fetch; let one fetch begin and
            # end after it, so the first inputs take the ordinary path.
            settled = fetch.calls + 2
            await _until(lambda: fetch.calls >= settled, 10, "a fetch after the assignment")
            await send(before)
            await _until(lambda: _at_least(outputs, len(before)), 60, "the first inputs processed")
            fetch.armed = True
            await asyncio.wait_for(fetch.entered.wait(), 10)
            # The fetch loop is inside getmany() with the current generation. The group
            # takes the partitions away and gives them back (what the rebalance listener
            # does), then new input arrives after the seek to committed.
            everything = set(engine.tasks)
            await engine.release(everything)
            await engine.acquire(everything)
            await _until(lambda: sorted(engine.tasks) == [0, 1, 2] and not engine.recovering, 60,
                         "the tasks opened again")  # fmt: skip
            await send(after)
            fetch.gate.set()
            await _until(lambda: fetch.returned, 30, "the held fetch to return records")
            await _until(lambda: _at_least(outputs, len(inputs)), 60,
                         "the records fetched across the reassignment processed")  # fmt: skip
            return dict(engine.stats)
        finally:
            await engine.stop()

    stats = asyncio.run(scenario())
    assert stats["refetches"] >= 1, "the held fetch was never treated as stale"
    _verify(settings, inputs, dead=set())


# ---- failures the engine must recover from without a restart -------------------------------
# Each runs the engine in-process against the real broker and real RocksDB, causes one
# failure through the real system (another producer taking a transactional id, a RocksDB
# lock held elsewhere, a database closed under the task) and requires every input to come
# out exactly once afterwards, with no restart and nothing dead-lettered.


def _engine_scenario(settings: Settings, body) -> dict[str, float]:
    """Run `body(engine)` against a started engine that owns every task; return its stats."""
    from paysaga.streams.app.assembly import create_engine

    async def scenario() -> dict[str, float]:
        engine = create_engine(settings)
        await engine.start()
        try:
            await body(engine)
            await _until(lambda: engine.ready, 60, f"the engine ready again ({engine.failed})")
            return dict(engine.stats)
        finally:
            await engine.stop()

    return asyncio.run(scenario())


def _recovery_case(broker: LocalBroker, tmp_path: Path, name: str, n: int, seed: int):
    """Settings with its topics, `n` inputs and the both-outputs probe for one scenario."""
    settings = _settings(broker, tmp_path, name, max_batch=50)
    pipelines.create_topics(settings)
    return settings, _inputs(n, seed=seed), _output_count(settings)


async def _first_processed(engine, settings: Settings, items, outputs) -> None:
    """Wait until the engine owns every task, then send `items` and see them processed."""
    await _until(lambda: engine.ready and sorted(engine.tasks) == [0, 1, 2], 60,
                 "the engine owns every task")  # fmt: skip
    await _send(settings, items)
    await _until(lambda: _at_least(outputs, len(items)), 60, "the first inputs processed")


def test_task_fenced_without_a_rebalance_comes_back(broker: LocalBroker, tmp_path: Path) -> None:
    """A task whose producer is fenced while the group still gives it to us recovers.

    Another producer initialises task 0's transactional id (what the coordinator does to a
    transaction that outlives its timeout, or a stray process with the same app id does):
    task 0's next transaction is fenced. Without a rebalance nobody would ever process
    partition 0 again; the engine must drop the task, rejoin the group, get partition 0
    back and open it again from committed state.
    """
    settings, inputs, outputs = _recovery_case(broker, tmp_path, "fenced", 300, seed=12)

    async def body(engine) -> None:
        await _first_processed(engine, settings, inputs[:100], outputs)
        usurper = AIOKafkaProducer(bootstrap_servers=settings.bootstrap,
                                   transactional_id=f"{settings.app_id}-task-0")  # fmt: skip
        await usurper.start()  # InitProducerId: task 0's producer epoch is now stale
        await usurper.stop()
        partitions = await _send(settings, inputs[100:])
        assert 0 in partitions
        await _until(lambda: engine.stats["fenced"] >= 1, 60, "task 0 fenced")
        await _until(lambda: _at_least(outputs, len(inputs)), 90, "every input processed")

    stats = _engine_scenario(settings, body)
    assert stats["rejoins"] >= 1
    assert stats["dead_letters"] == 0
    _verify(settings, inputs, dead=set())


def test_task_that_cannot_be_opened_is_opened_again(broker: LocalBroker, tmp_path: Path) -> None:
    """A task that fails to open at assignment is reported and opened again later.

    Task 1's RocksDB database is locked by another handle, so opening it at assignment
    fails (inside aiokafka's rebalance callback, which swallows exceptions). The worker must
    say it is not ready and why, keep processing the other partitions, and open task 1 as
    soon as it can, processing its inputs exactly once.
    """
    from paysaga.streams.app.assembly import store_manager

    settings, inputs, outputs = _recovery_case(broker, tmp_path, "locked", 240, seed=13)
    held = store_manager(settings).open(pipelines.TOTALS, 1)  # holds the database's LOCK

    async def body(engine) -> None:
        await _until(lambda: engine.assigned and 1 in engine.broken, 60, "task 1 reported")
        assert not engine.ready
        assert "task 1" in (engine.failed or "")
        partitions = await _send(settings, inputs)
        others = sum(1 for p in partitions if p != 1)
        assert others < len(inputs), "no input landed on partition 1"
        await _until(lambda: _at_least(outputs, others), 60, "the other partitions processed")
        assert await outputs() == others  # nothing of partition 1 before its task is open
        held.close()
        await _until(lambda: _at_least(outputs, len(inputs)), 60, "partition 1 processed")

    stats = _engine_scenario(settings, body)
    assert stats["rebuilds"] >= 1
    _verify(settings, inputs, dead=set())


def test_store_failure_rebuilds_the_task(broker: LocalBroker, tmp_path: Path) -> None:
    """A RocksDB failure under a running task rebuilds it; the record is not poison.

    The test closes task 2's database under the engine, so the next read of the agent
    fails in RocksDB. That is the database's fault, not the record's: the batch must not go
    to the DLQ. The task is closed and opened again from its changelog, and processing goes
    on exactly once.
    """
    settings, inputs, outputs = _recovery_case(broker, tmp_path, "storefail", 200, seed=14)

    async def body(engine) -> None:
        await _first_processed(engine, settings, inputs[:80], outputs)
        engine.store(pipelines.TOTALS, 2).close()
        partitions = await _send(settings, inputs[80:])
        assert 2 in partitions
        await _until(lambda: engine.stats["rebuilds"] >= 1, 60, "task 2 rebuilt")
        await _until(lambda: _at_least(outputs, len(inputs)), 60, "every input processed")

    stats = _engine_scenario(settings, body)
    assert stats["dead_letters"] == 0
    _verify(settings, inputs, dead=set())


class GatedRestore:
    """Holds the next restore of task `p` at a gate, once its store is open and caught up.

    The real `Recovery.restore` does all the work; the gate only decides when it returns, which
    makes a long changelog replay (a rebuild of a big store) last as long as the test needs.
    """

    def __init__(self, engine, p: int) -> None:
        self.real, self.p = engine.recovery.restore, p
        self.armed = False
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()
        self.cancelled = False

    async def __call__(self, table: str, p: int):
        store = await self.real(table, p)
        if not self.armed or p != self.p:
            return store
        self.armed = False
        self.entered.set()
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            store.close()  # what `Recovery.restore` does when cancelled inside
            raise
        return store


async def _break_task_2_and_hold_its_rebuild(engine, settings, inputs, outputs) -> GatedRestore:
    """Process the first inputs, then make task 2's rebuild wait at a gate."""
    await _first_processed(engine, settings, inputs, outputs)
    restore = GatedRestore(engine, 2)
    engine.recovery.restore = restore
    restore.armed = True
    engine.store(pipelines.TOTALS, 2).close()  # its next read fails: the task is rebuilt
    return restore


def test_a_rebuild_does_not_hold_up_the_other_tasks(broker: LocalBroker, tmp_path: Path) -> None:
    """While one task replays its changelog, the worker's other tasks go on committing.

    Task 2 is rebuilt after a RocksDB failure and its restore is held open. Inputs of
    partitions 0 and 1 must be processed meanwhile (a rebuild run in the fetch loop, or
    under the engine's lock, would stop them all); once the restore ends, task 2 catches up
    and every input comes out exactly once.
    """
    settings, inputs, outputs = _recovery_case(broker, tmp_path, "rebuildbg", 300, seed=15)
    first, breaking, later = inputs[:60], inputs[60:120], inputs[120:]

    async def body(engine) -> None:
        restore = await _break_task_2_and_hold_its_rebuild(engine, settings, first, outputs)
        partitions = await _send(settings, breaking)
        assert 2 in partitions
        await asyncio.wait_for(restore.entered.wait(), 60)
        done = len(first) + sum(1 for p in partitions if p != 2)
        await _until(lambda: _at_least(outputs, done), 60, "the inputs of partitions 0 and 1")
        # Sent while task 2 restores: only a fetch loop that goes on can read them.
        partitions = await _send(settings, later)
        others = done + sum(1 for p in partitions if p != 2)
        assert 2 in partitions and others < len(inputs)
        await _until(lambda: _at_least(outputs, others), 60,
                     "partitions 0 and 1 processed while task 2 restores")  # fmt: skip
        assert 2 in engine.broken and not engine.ready
        restore.gate.set()
        await _until(lambda: _at_least(outputs, len(inputs)), 60, "partition 2 processed")

    stats = _engine_scenario(settings, body)
    assert stats["rebuilds"] == 1
    assert stats["dead_letters"] == 0
    _verify(settings, inputs, dead=set())


def test_a_rebalance_cancels_a_rebuild_in_flight(broker: LocalBroker, tmp_path: Path) -> None:
    """A rebalance during a rebuild cancels it, and the new assignment opens the task.

    Without the cancel, the rebuild's open RocksDB store and producer would meet the
    assignment's own open of the same task: a locked database, and two producers with one
    transactional id fencing each other.
    """
    settings, inputs, outputs = _recovery_case(broker, tmp_path, "rebuildcancel", 200, seed=16)

    async def body(engine) -> None:
        restore = await _break_task_2_and_hold_its_rebuild(engine, settings, inputs[:60],
                                                           outputs)  # fmt: skip
        partitions = await _send(settings, inputs[60:])
        assert 2 in partitions
        await asyncio.wait_for(restore.entered.wait(), 60)
        everything = set(engine.tasks) | {2}  # what the group takes away and gives back
        await engine.release(everything)
        assert restore.cancelled, "the rebuild in flight was not cancelled"
        await engine.acquire(everything)
        await _until(lambda: 2 in engine.tasks and not engine.recovering, 60, "task 2 opened")
        assert 2 not in engine.broken, engine.failed
        await _until(lambda: _at_least(outputs, len(inputs)), 60, "every input processed")

    stats = _engine_scenario(settings, body)
    assert stats["rebuilds"] == 0  # the assignment opened task 2, not the cancelled rebuild
    assert stats["fenced"] == 0 and stats["dead_letters"] == 0
    _verify(settings, inputs, dead=set())


def test_a_rebuild_installed_under_load_costs_the_other_tasks_nothing(
    broker: LocalBroker, tmp_path: Path
) -> None:
    """Records of the other tasks fetched while a rebuilt task is installed are kept.

    The fetch loop is inside `getmany()` (held at a gate) when task 2's rebuild installs it
    and seeks it to committed, while task 0 is busy (its commit held at a gate). The fetch
    then returns new records of partition 0. Only partition 2's part of that fetch is
    stale: throwing partition 0's away would skip them for good, since aiokafka has moved
    past them and a busy task is not sought back, and task 0's next batch would commit
    past the gap.
    """
    settings, inputs, outputs = _recovery_case(broker, tmp_path, "rebuildload", 400, seed=19)
    first, middle = inputs[:60], inputs[60:120]
    sent = first + middle

    async def body(engine) -> None:
        restore = await _break_task_2_and_hold_its_rebuild(engine, settings, first, outputs)
        committing, held = asyncio.Event(), asyncio.Event()

        async def hold() -> None:
            committing.set()
            await held.wait()

        _before_commits(engine.tasks[0], hold)
        try:
            partitions = await _send(settings, middle)
            assert 0 in partitions and 2 in partitions
            await asyncio.wait_for(restore.entered.wait(), 60)
            await asyncio.wait_for(committing.wait(), 60)  # task 0 is busy
            fetch = GatedFetch(engine.consumer)
            engine.consumer.getmany = fetch
            fetch.only = (TopicPartition(pipelines.names(settings)[0], 0),)
            fetch.armed = True
            await asyncio.wait_for(fetch.entered.wait(), 60)
            restore.gate.set()  # task 2 is installed and sought while the fetch is held
            await _until(lambda: 2 in engine.tasks and 2 not in engine.broken, 60,
                         "task 2 back")  # fmt: skip
            home = {key: p for (key, _), p in zip(middle, partitions, strict=True)}
            later = [(key, value) for key, value in inputs[120:] if home.get(key) == 0]
            assert later
            await _send(settings, later)
            sent.extend(later)
            fetch.gate.set()
            await _until(lambda: fetch.returned, 30, "the held fetch of partition 0")
        finally:
            held.set()  # never leave task 0 held: stopping the engine waits for it
        await _until(lambda: _at_least(outputs, len(sent)), 60, "every input processed")

    stats = _engine_scenario(settings, body)
    assert stats["rebuilds"] == 1 and stats["dead_letters"] == 0
    _verify(settings, sent, dead=set())


async def _group_state(settings: Settings) -> tuple[str, int]:
    """The worker group's state at the broker and how many members it has."""
    async with _admin(settings) as admin:
        [response] = await admin.describe_consumer_groups([settings.app_id])
    group = response.to_object()["groups"][0]
    return group["state"], len(group["members"])


def test_a_restore_longer_than_the_session_keeps_the_membership(
    broker: LocalBroker, tmp_path: Path
) -> None:
    """A task whose restore outlasts the session timeout costs the worker nothing.

    aiokafka sends no heartbeats while its assignment callback runs. Restoring inside it
    (task 1's restore is held at a gate for 1.5 session timeouts here) would get the
    worker expelled from the group, and a rebalance after. The tasks are opened after the
    callback instead: the broker still counts the worker as a member, no partition is
    given up, and once the restore ends every input comes out exactly once.
    """
    from paysaga.streams.app.assembly import create_engine

    settings = _settings(broker, tmp_path, "longrestore", max_batch=50, session_timeout_ms=6000)
    pipelines.create_topics(settings)
    inputs, outputs = _inputs(200, seed=20), _output_count(settings)
    releases: list[set[int]] = []

    async def scenario() -> dict[str, float]:
        engine = create_engine(settings)
        restore = GatedRestore(engine, 1)
        engine.recovery.restore = restore  # type: ignore[method-assign]
        restore.armed = True
        real_release = engine.release

        async def release(partitions: set[int]) -> None:
            if partitions:  # aiokafka's first join "revokes" the empty assignment
                releases.append(set(partitions))
            await real_release(partitions)

        engine.release = release  # type: ignore[method-assign]
        await engine.start()
        try:
            await asyncio.wait_for(restore.entered.wait(), 60)
            await _send(settings, inputs)
            # Not a wait for an event: the session timeout has to pass without the restore
            # ending, which is what a long restore is.
            await asyncio.sleep(1.5 * settings.session_timeout_ms / 1000)
            assert await _group_state(settings) == ("Stable", 1)
            assert engine.recovering and not engine.ready
            restore.gate.set()
            await _until(lambda: engine.ready, 60, "the engine ready")
            await _until(lambda: _at_least(outputs, len(inputs)), 60, "every input processed")
            assert not releases, f"partitions given up during the restore: {releases}"
            return dict(engine.stats)
        finally:
            restore.gate.set()
            await engine.stop()

    stats = asyncio.run(scenario())
    assert stats["rebuilds"] == 0 and stats["dead_letters"] == 0
    _verify(settings, inputs, dead=set())


def _before_commits(task, hook) -> None:
    """Run `await hook()` before each real `commit_transaction()` of `task`'s producer."""
    real = task.producer.commit_transaction

    async def commit() -> None:
        await hook()
        await real()

    task.producer.commit_transaction = commit


def test_a_store_write_failing_after_the_commit_rebuilds_the_task(
    broker: LocalBroker, tmp_path: Path
) -> None:
    """The batch is committed, then writing it to RocksDB fails: the task is rebuilt and
    its store catches up from the changelog; the batch is neither lost nor processed twice.

    Task 2's database is closed while its batch commits (after the agent's reads, before
    the write), so RocksDB refuses the write of a committed batch.
    """
    settings, inputs, outputs = _recovery_case(broker, tmp_path, "applyfail", 200, seed=17)

    async def body(engine) -> None:
        await _first_processed(engine, settings, inputs[:80], outputs)
        store = engine.store(pipelines.TOTALS, 2)
        closed: list[bool] = []

        async def lose_the_store() -> None:
            if not closed:
                closed.append(True)
                store.close()

        _before_commits(engine.tasks[2], lose_the_store)
        partitions = await _send(settings, inputs[80:])
        assert 2 in partitions
        await _until(lambda: engine.stats["rebuilds"] >= 1, 60, "task 2 rebuilt")
        await _until(lambda: _at_least(outputs, len(inputs)), 60, "every input processed")
        assert closed

    stats = _engine_scenario(settings, body)
    assert stats["rebuilds"] == 1
    assert stats["aborts"] == 0  # the failing batch was committed, not aborted and redone
    assert stats["dead_letters"] == 0
    _verify(settings, inputs, dead=set())  # includes: local RocksDB = changelog = fold


def test_backpressure_pauses_only_the_slow_task(broker: LocalBroker, tmp_path: Path) -> None:
    """A task whose commits are held back stops fetching for itself only.

    Task 2's commit waits at a gate while a burst of input arrives: its queue passes the
    limit and its input partition is paused, and partitions 0 and 1 are processed in full
    meanwhile. Once the gate opens, task 2 drains, resumes, and every input comes out
    exactly once.
    """
    settings, inputs, outputs = _recovery_case(broker, tmp_path, "backpressure", 900, seed=18)
    source = pipelines.names(settings)[0]

    async def body(engine) -> None:
        first = await _send(settings, inputs[:60])
        await _until(lambda: _at_least(outputs, 60), 60, "the first inputs processed")
        gate = asyncio.Event()
        _before_commits(engine.tasks[2], gate.wait)
        sent = Counter(first + await _send(settings, inputs[60:]))
        assert sent[2] > 2 * 2 * settings.max_batch, "too few inputs on partition 2 to pause it"
        await _until(lambda: TopicPartition(source, 2) in engine.consumer.paused(), 60,
                     "partition 2 paused")  # fmt: skip

        async def others_done() -> bool:
            # Input offsets, not outputs: task 2's open transaction holds back what
            # read_committed readers see on the output partitions it wrote to.
            done = await _group_offsets(settings)
            return done.get(0) == sent[0] and done.get(1) == sent[1]

        await _until(others_done, 60, "partitions 0 and 1 processed")
        assert TopicPartition(source, 0) not in engine.consumer.paused()
        assert TopicPartition(source, 1) not in engine.consumer.paused()
        gate.set()
        await _until(lambda: _at_least(outputs, len(inputs)), 60, "partition 2 drained")
        assert TopicPartition(source, 2) not in engine.consumer.paused()

    stats = _engine_scenario(settings, body)
    assert stats["dead_letters"] == 0
    _verify(settings, inputs, dead=set())


def test_a_timer_failure_clears_once_the_timers_run_cleanly(
    broker: LocalBroker, tmp_path: Path
) -> None:
    """A punctuator that raised makes the worker not ready, until the timers run cleanly.

    On an idle partition whose timers emit nothing there is no commit to clear the failure:
    readiness must come back from the next clean timer run, not stay false for good.
    """
    settings = _settings(broker, tmp_path, "timer", topology="tests.pipelines:flaky_timer_topology")
    pipelines.create_topics(settings)
    seen: list[str] = []

    async def body(engine) -> None:
        await _until(lambda: engine.stats["punctuate_errors"] >= 1, 60, "the timer's failure")
        seen.append(engine.failed or "")

    stats = _engine_scenario(settings, body)  # then waits for ready again
    assert "punctuation: RuntimeError" in seen[0]
    assert stats["punctuate_errors"] == 1
    assert stats["punctuations"] >= 1


def test_the_commit_interval_gathers_a_trickle_into_few_transactions(
    broker: LocalBroker, tmp_path: Path
) -> None:
    """Records that trickle in join a task's next batch instead of a transaction each
    (docs/architecture.md#the-commit-interval), and every input still comes out once.

    Inputs arrive in small groups every 20 ms for a few seconds. With a 400 ms interval each
    of the three tasks starts at most one batch per 400 ms (plus the first); without it the
    same trickle makes a transaction every few groups.
    """
    interval_ms = 400
    settings, inputs, outputs = _recovery_case(broker, tmp_path, "interval", 600, seed=23)
    settings = settings.model_copy(update={"engine_commit_interval_ms": interval_ms})
    source = pipelines.names(settings)[0]

    async def body(engine) -> None:
        await _first_processed(engine, settings, inputs[:30], outputs)
        before, started = engine.stats["batches"], time.monotonic()
        trickle = PacedProducer(settings, source, [(k, json.dumps(v).encode())
                                                   for k, v in inputs[30:]], 240)  # fmt: skip
        trickle.start()
        await asyncio.to_thread(trickle.join, 60)
        assert trickle.error is None and trickle.sent == len(inputs) - 30
        groups = trickle.sent  # sent one by one, a few milliseconds apart
        await _until(lambda: _at_least(outputs, len(inputs)), 60, "every input processed")
        batches = engine.stats["batches"] - before
        most = 3 * (int((time.monotonic() - started) * 1000 / interval_ms) + 2)
        assert groups > most, f"{groups} groups in {most} intervals: no trickle to gather"
        assert 0 < batches <= most, f"{batches} batches, at most {most} with the interval"

    _engine_scenario(settings, body)
    _verify(settings, inputs, dead=set())
