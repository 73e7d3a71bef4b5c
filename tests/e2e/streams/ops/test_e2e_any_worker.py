"""Any worker answers, through the broker: two worker processes, every payment asked of
both; the owner answers from its committed state, the other forwards once and says so.
While a third worker joins and one is SIGKILLed (two rebalances, with restores), queries
never stop, and every answer is the right payment or a 503 with Retry-After; never another
payment, a 404 for a payment that exists, or a 5xx other than 503."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from paysaga.streams.app.net import free_port
from paysaga.streams.app.settings import Settings
from paysaga.streams.engine.partitioner import partition_for
from paysaga.streams.ops.routing import H_FORWARDED_BY, H_PARTITION, H_SERVED_BY
from tests.saga_support import World
from tests.samples import initiated
from tests.support import WorkerProcess, wait_for

N = 12


def second(settings: Settings, tmp_path: Path, name: str) -> Settings:
    """Another worker of the same application: its own port and state directory."""
    return settings.model_copy(update={"web_port": free_port(), "data_dir": tmp_path / name})


def owned(w: WorkerProcess) -> set[int]:
    code, body = w.get("/ready/")
    return set(body["tasks"]) if code == 200 and isinstance(body, dict) else set()


def check(w: WorkerProcess, pid: str, partitions: int,
          dying: Callable[[], bool] = lambda: False) -> tuple[int, dict[str, str]]:  # fmt: skip
    """One query: the right payment (200) or 503 with Retry-After, nothing else (`dying`:
    a worker being killed may also drop the connection, 0; asked once the query is over,
    since a query sent while the worker was up is dropped when it is killed mid-query)."""
    # A worker busy with a rebalance may answer slowly (a loaded CI machine once took over
    # 5 s): slow is not wrong, so the client waits longer than the worker's own 2 s hop.
    code, body, headers = w.request(f"/payments/{pid}/", timeout=20.0)
    if code == 0 and dying():
        return code, headers
    assert code != 0, f"no answer from the live worker {w.settings.web_endpoint} ({pid})"
    if code == 200:
        assert json.loads(body)["payment_id"] == pid, (pid, body[:200])
        assert headers[H_PARTITION] == str(partition_for(pid.encode(), partitions))
    else:
        assert code == 503 and headers.get("Retry-After"), (pid, code, body[:300])
    return code, headers


def test_every_payment_is_answered_by_either_worker_and_rebalances_give_no_wrong_answer(
    worker_factory, topics: Settings, tmp_path: Path
) -> None:
    a = worker_factory(topics, "a").start()
    b = worker_factory(second(topics, tmp_path, "b"), "b").start(wait_ready=False)
    wait_for(lambda: owned(a) and owned(b) and not owned(a) & owned(b), 90,
             what="two workers sharing the tasks")  # fmt: skip
    world = World(topics)
    defaults = {"saga": "PAYMENT", "items": [], "capture_mode": "MANUAL"}
    pids = [world.initiate(p)["payment_id"] for p in initiated(N, seed=777, **defaults)]
    for pid in pids:
        world.wait_command(pid, "AUTHORIZE")
    endpoint = {w: w.settings.web_endpoint for w in (a, b)}
    mine = {w: owned(w) for w in (a, b)}
    for pid in pids:
        p = partition_for(pid.encode(), topics.partitions)
        for w in (a, b):
            code, headers = check(w, pid, topics.partitions)
            assert code == 200, (pid, w.settings.web_port)
            owner = a if p in mine[a] else b
            assert headers[H_SERVED_BY] == endpoint[owner]
            assert headers.get(H_FORWARDED_BY) == (None if w is owner else endpoint[w])
    code, body, _ = a.request("/payments/pay_no_such_payment/")
    assert code == 404 and json.loads(body)["code"] == "not_found"

    # Rebalances under queries: a third worker joins, then one is SIGKILLed.
    stop = threading.Event()
    seen: Counter[int] = Counter()
    errors: list[BaseException] = []
    live = [a, b]  # the workers queried: each one up and answering

    def query() -> None:
        i = 0
        while not stop.is_set():
            w = live[i % len(live)]

            def dying(w: WorkerProcess = w) -> bool:
                # `live` loses a worker before it is killed: by the time a query the kill
                # dropped returns, its worker is no longer in `live`.
                return w not in live

            try:
                code, _ = check(w, pids[i % N], topics.partitions, dying=dying)
                seen[code] += 1
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)
                return
            i += 1

    thread = threading.Thread(target=query, daemon=True)
    thread.start()
    try:
        c = worker_factory(second(topics, tmp_path, "c"), "c").start(wait_ready=False)
        wait_for(lambda: owned(c), 90, what="the third worker owning a task")
        live.append(c)
        live.remove(b)
        b.kill()
        wait_for(lambda: owned(a) | owned(c) == set(range(topics.partitions)), 90,
                 what="b's tasks taken over")  # fmt: skip
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors[0]
    assert seen[200] > 0 and set(seen) <= {0, 200, 503}, seen

    # settled: every payment answered by both survivors again
    def all_answered() -> bool:
        return all(check(w, pid, topics.partitions)[0] == 200 for pid in pids for w in (a, c))

    wait_for(all_answered, 60, what="every payment from both survivors after the rebalances")
