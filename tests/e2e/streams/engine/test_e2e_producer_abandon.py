"""A task's producer that cannot stop holds nothing up, and still ends.

When a task is closed while its broker does not answer (frozen, partitioned away), the
producer's `stop()` waits to flush, and aiokafka keeps retrying for as long as that lasts.
The engine waits for it only up to a deadline and lets it go on stopping in the background;
this proves that the engine goes on at once, and that the producer does finish stopping,
connections closed, once the broker answers again. (Cancelling the stop instead leaves its
sender task and its connections behind for good.) The broker here is a node of the test's
own, frozen with SIGSTOP: the session broker must keep answering the other tests.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from paysaga.streams.app.net import free_port
from paysaga.streams.dev.broker import LocalBroker
from paysaga.streams.engine.recovery import stop_producer


def _connections_to(port: int) -> int:
    """This process's established TCP connections to `port` (read from /proc)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                remote, state, inode = fields[2], fields[3], fields[9]
                if state == "01" and inode in inodes and int(remote.rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


async def _create_topic(bootstrap: str, name: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 1, 1)])
    finally:
        await admin.close()


@pytest.mark.slow  # a Kafka broker of its own
def test_a_producer_that_cannot_stop_is_abandoned_cleanly(tmp_path: Path) -> None:
    node = LocalBroker(tmp_path / "kafka", free_port())
    node.up(timeout=120)
    pid = node.pid()
    assert pid is not None
    frozen = False

    async def scenario() -> tuple[int, bool]:
        nonlocal frozen
        await _create_topic(node.bootstrap, "abandon.out")
        producer = AIOKafkaProducer(bootstrap_servers=node.bootstrap, acks="all",
                                    transactional_id="abandon-task-0")  # fmt: skip
        await producer.start()
        await producer.begin_transaction()
        await (await producer.send("abandon.out", b"acknowledged"))
        assert _connections_to(node.port) > 0
        os.kill(pid, signal.SIGSTOP)  # the broker stops answering, connections stay open
        frozen = True
        unsent = await producer.send("abandon.out", b"never acknowledged")
        # Returns at its deadline although the producer cannot stop (a hang fails here).
        await asyncio.wait_for(stop_producer(0, producer, timeout=0.5), 30)
        assert not unsent.done(), "the producer was not stuck: the test proves nothing"
        os.kill(pid, signal.SIGCONT)  # the outage ends
        frozen = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 90
        while (_connections_to(node.port) or not unsent.done()) and loop.time() < deadline:
            await asyncio.sleep(0.1)
        return _connections_to(node.port), unsent.done()

    try:
        connections, settled = asyncio.run(scenario())
    finally:
        if frozen:
            os.kill(pid, signal.SIGCONT)
        node.down()
    assert settled, "the abandoned producer's unsent record never settled"
    assert connections == 0, "the abandoned producer kept its connections open"
