"""`/metrics` of a worker process through the broker, scraped as Prometheus would: the
token guards it, the saga's figures count what was committed (a duplicate answer once),
every owned input partition has its lag, every task its breaker, and the engine's
counters move. The test plays the gateway."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import create_topics
from tests.saga_support import World
from tests.samples import initiated
from tests.support import WorkerProcess, isolated_settings, wait_for

Samples = dict[str, list[tuple[dict[str, str], float]]]


@pytest.fixture(scope="module")
def worker(broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    tmp: Path = tmp_path_factory.mktemp("metrics")
    settings: Settings = isolated_settings(broker.bootstrap, tmp / "state", "metrics",
                                           web_token="scrape-me", punctuate_ms=100)  # fmt: skip
    asyncio.run(create_topics(settings))
    w = WorkerProcess(settings, tmp / "worker.log").start()
    yield w
    w.kill()


def scrape(worker: WorkerProcess) -> Samples:
    code, body = worker.fetch("/metrics")
    assert code == 200, body
    out: Samples = defaultdict(list)
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[s.name].append((s.labels, s.value))
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for lv, v in samples.get(name, []) if labels.items() <= lv.items())


def test_metrics_need_the_token(worker: WorkerProcess) -> None:
    code, _ = worker.fetch("/metrics", auth=False)
    assert code == 401
    assert worker.fetch("/health/", auth=False)[0] == 200


def test_what_the_saga_committed_is_what_metrics_say(worker: WorkerProcess) -> None:
    world = World(worker.settings)
    defaults = {"saga": "PAYMENT", "items": [], "capture_mode": "AUTOMATIC"}
    ok, declined = initiated(2, seed=4242, **defaults)
    world.initiate(ok)
    world.initiate(declined)
    auth = world.wait_command(ok["payment_id"], "AUTHORIZE")
    world.answer(auth, "AUTHORIZED")
    world.answer(auth, "AUTHORIZED")  # a duplicate delivery: applied once
    world.answer(world.wait_command(ok["payment_id"], "CAPTURE"), "CAPTURED")
    world.answer(world.wait_command(declined["payment_id"], "AUTHORIZE"), "FAILED",
                 code="card_declined", reason="declined")  # fmt: skip
    for p in (ok, declined):
        world.terminal(p["payment_id"])

    def ended() -> Samples | None:
        s = scrape(worker)
        return s if total(s, "paysaga_sagas_ended_total") == 2 else None

    s = wait_for(ended, 30, what="both ended sagas in /metrics")
    assert total(s, "paysaga_sagas_ended_total", state="COMPLETED") == 1
    assert total(s, "paysaga_sagas_ended_total", state="FAILED") == 1
    assert total(s, "paysaga_gateway_answers_total", step="authorize", result="ok") == 1
    assert total(s, "paysaga_gateway_answers_total", step="authorize", result="declined") == 1
    assert total(s, "paysaga_intake_decisions_total", decision="new") == 2
    assert total(s, "paysaga_commands_sent_total", action="AUTHORIZE") == 2
    assert total(s, "paysaga_request_to_authorized_seconds_count") == 1
    assert total(s, "paysaga_engine_batches_total") > 0
    assert total(s, "paysaga_engine_commit_seconds_count") > 0
    assert total(s, "paysaga_ready") == 1
    n = worker.settings.partitions
    lagged = {(lv["topic"], lv["partition"]) for lv, _ in s["paysaga_consumer_lag"]}
    assert {p for _, p in lagged} == {str(i) for i in range(n)}
    assert (world.t.accepted, "0") in lagged
    closed = [lv["partition"] for lv, v in s["paysaga_breaker_state"]
              if lv["state"] == "closed" and v == 1]  # fmt: skip
    assert sorted(closed) == [str(i) for i in range(n)]
