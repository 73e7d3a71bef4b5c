"""Fixtures: one real Apache Kafka node per test session, isolated settings per test.

The broker comes from `paysaga.streams.dev.broker` (jars from Maven Central); nothing here
mocks Kafka or RocksDB, and a broker that cannot start fails the session.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from paysaga.streams.app.net import free_port
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import create_topics
from paysaga.streams.dev.broker import LocalBroker
from tests.support import WorkerProcess, isolated_settings

_ids = itertools.count(1)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    node = LocalBroker(tmp_path_factory.mktemp("kafka"), free_port())
    took = node.up(timeout=120)
    print(f"\nlocal Kafka broker ready at {node.bootstrap} in {took:.1f}s")
    yield node
    node.down()


@pytest.fixture
def settings(broker: LocalBroker, tmp_path: Path) -> Settings:
    """Settings for one test: its own topic prefix, app id, state dir and web port."""
    n = next(_ids)
    return isolated_settings(broker.bootstrap, tmp_path / "state", f"t{n}")


@pytest.fixture
def topics(settings: Settings) -> Settings:
    """`settings` with every topic created."""
    asyncio.run(create_topics(settings))
    return settings


@pytest.fixture
def worker_factory(topics: Settings, tmp_path: Path) -> Iterator:
    started: list[WorkerProcess] = []

    def make(settings: Settings | None = None, name: str = "worker") -> WorkerProcess:
        w = WorkerProcess(settings or topics, tmp_path / f"{name}-{len(started)}.log")
        started.append(w)
        return w

    yield make
    for w in started:
        w.kill()
