"""Test helpers: a worker subprocess, polling with deadlines, and Kafka read-outs.

Waiting is always a poll for an observable condition with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from aiokafka import AIOKafkaProducer

from paysaga.streams.app.settings import Settings

T = TypeVar("T")


def wait_for(
    probe: Callable[[], T | Literal[False] | None],
    timeout: float = 60.0,
    interval: float = 0.2,
    what: str = "condition",
) -> T:
    """Poll `probe` until it returns a truthy value; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def paysaga(settings: Settings, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The `paysaga` command as an operator runs it: a subprocess with `settings`' env."""
    return subprocess.run(
        [sys.executable, "-m", "paysaga.streams.ops.cli", *args], env=settings_env(settings),
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def redrive(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    """`paysaga dlq redrive ARGS`; whatever its exit status, never a traceback."""
    done = paysaga(settings, "dlq", "redrive", *args)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def produce(settings: Settings, topic: str, items: list[tuple[Any, ...]]) -> list[Any]:
    """Send (key, value, headers, partition) tuples; returns their metadata."""

    async def go() -> list[Any]:
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all")
        await producer.start()
        try:
            futures = [await producer.send(topic, value, key=key, headers=headers,
                                           partition=part)
                       for key, value, headers, part in items]  # fmt: skip
            return list(await asyncio.gather(*futures))
        finally:
            await producer.stop()

    return asyncio.run(go())


def isolated_settings(bootstrap: str, state: Path, name: str, **overrides: Any) -> Settings:
    """Settings for one test: its own topic prefix, app id, state dir and web port."""
    from paysaga.streams.app.net import free_port

    values: dict[str, Any] = {
        "bootstrap": bootstrap, "app_id": f"paysaga-{name}", "topic_prefix": f"{name}.",
        "partitions": 3, "data_dir": state, "web_port": free_port(), "log_level": "INFO",
        # Settlement batches of 2 s, submitted 0.5 s after their end: a payment settles
        # within a few seconds of its capture, by the worker's idle stream time.
        "settlement_batch_ms": 2_000, "settlement_cutoff_ms": 500,
    }  # fmt: skip
    values.update(overrides)
    return Settings(**values)


def settings_env(settings: Settings) -> dict[str, str]:
    """PAYSAGA_* variables that reproduce `settings` in a child process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYSAGA_")}
    for name, value in settings.model_dump(mode="json").items():
        if value is not None:
            env["PAYSAGA_" + name.upper()] = str(value)
    return env


class WorkerProcess:
    """One `paysaga worker` in its own process, so tests can stop or SIGKILL it."""

    def __init__(self, settings: Settings, log: Path) -> None:
        self.settings = settings
        self.log = log
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.settings.web_host}:{self.settings.web_port}"

    def start(self, wait_ready: bool = True) -> WorkerProcess:
        out = open(self.log, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "paysaga.streams.ops.cli", "worker"],
            env=settings_env(self.settings),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if wait_ready:
            wait_for(self.ready, 90, what=f"worker ready (log {self.log})")
        return self

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"worker exited with {self.proc.returncode}: {self.tail()}")
        code, _ = self.get("/ready/")
        return code == 200

    def fetch(self, path: str, auth: bool = True) -> tuple[int, bytes]:
        """GET `path` (with the web token unless `auth` is False): status and body; 0 when
        the worker does not answer."""
        code, body, _ = self.request(path, auth)
        return code, body

    def request(self, path: str, auth: bool = True,
                timeout: float = 5.0) -> tuple[int, bytes, dict[str, str]]:  # fmt: skip
        """GET `path`: status, body and response headers (0 when nobody answers)."""
        return self.call("GET", path, auth=auth, timeout=timeout)

    def call(self, method: str, path: str, body: Any = None,
             headers: dict[str, str] | None = None, auth: bool = True,
             timeout: float = 5.0) -> tuple[int, bytes, dict[str, str]]:  # fmt: skip
        """`method path` with `body` as JSON (bytes as they are): status, body and response
        headers (0 when nobody answers)."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers=headers or {})  # fmt: skip
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if auth and self.settings.web_token:
            req.add_header("Authorization", f"Bearer {self.settings.web_token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read(), dict(resp.headers.items())
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), dict(exc.headers.items())
        except OSError:
            return 0, b"", {}

    def get(self, path: str) -> tuple[int, Any]:
        """GET a JSON view: status and parsed body (an error's text when not JSON)."""
        code, body = self.fetch(path)
        if code == 0:
            return 0, None
        try:
            return code, json.loads(body) if body else None
        except ValueError:
            return (0, None) if code < 400 else (code, body.decode(errors="replace"))

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def crash_while_recovering(self, pause: float) -> None:
        """Start the worker, and SIGKILL it `pause` seconds after it joined the group: it is
        restoring its tasks or running its first batches.
        """
        self.start(wait_ready=False)
        wait_for(self.joined, 90, what="the restarted worker joining the group")
        time.sleep(pause)  # a random moment to crash, not a wait
        self.kill()

    def joined(self) -> bool:
        """The group gave this worker its partitions: it is opening tasks or running them.

        (Its web views answer earlier, while it still waits to join.)
        """
        _, body = self.get("/ready/")
        return isinstance(body, dict) and bool(
            body.get("assigned") or body.get("recovering") or body.get("tasks")
        )

    def diagnosis(self) -> str:
        """What a failed wait should report: the worker's own view and its latest log."""
        return f"/ready/ says {self.get('/ready/')}; log tail:\n{self.tail(8000)}"

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def kill_repeatedly(
    worker: WorkerProcess, kills: int, progress: Callable[[], int], step: int,
    load: threading.Thread, rng: random.Random, timeout: float = 60.0,
) -> int:  # fmt: skip
    """SIGKILL `worker` `kills` times, each once `progress()` grew by `step` since the last
    kill, at a random moment after that, and restart it; every other restart is killed
    again while it recovers. Returns how many of those mid-recovery kills there were.

    The `load` must still be running at every kill: a worker that has caught up with a
    finished load has nothing in flight to crash into, and would never progress again.
    """
    recovering, done = 0, 0
    for kill in range(1, kills + 1):
        seen = done

        def grown(s: int = seen) -> int | Literal[False]:
            return (n := progress()) > s + step and n

        done = wait_for(grown, timeout, what=f"progress before kill {kill}")
        assert load.is_alive(), f"the load ended before kill {kill}"
        time.sleep(rng.uniform(0.0, 0.5))  # a random moment to crash, not a wait
        worker.kill()
        if kill % 2:
            worker.crash_while_recovering(rng.uniform(0.0, 0.5))
            recovering += 1
        worker.start(wait_ready=False)  # the next progress wait says it works
    return recovering


def kill_losing_state(worker: WorkerProcess, progress: Callable[[], int], step: int) -> None:
    """SIGKILL `worker` once `progress()` grew by `step`, delete its local state, restart it,
    and wait until it progresses again: restored from the changelog alone."""
    done = progress()
    wait_for(lambda: progress() > done + step, 60, what="progress before the wipe")
    worker.kill()
    settings = worker.settings
    shutil.rmtree(settings.data_dir / settings.app_id / "state")
    worker.start(wait_ready=False)
    done = progress()
    wait_for(lambda: progress() > done + step, 90, what="progress after the wipe")


class PacedProducer(threading.Thread):
    """Sends the inputs at about `rate`/s, so kills land while batches are in flight.

    `stop()` ends the load early; `sent` says how many of the inputs went out (all of them
    acknowledged once the thread has ended).
    """

    def __init__(self, settings: Settings, topic: str, items: list[tuple[bytes, bytes]],
                 rate: float) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.settings, self.topic, self.items, self.rate = settings, topic, items, rate
        self.error: BaseException | None = None
        self.sent = 0
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        try:
            asyncio.run(self._send())
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    async def _send(self) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.settings.bootstrap, acks="all",
                                    enable_idempotence=True, linger_ms=5)  # fmt: skip
        await producer.start()
        try:
            started = time.monotonic()
            for i, (key, value) in enumerate(self.items):
                if self._halt.is_set():
                    break
                await producer.send(self.topic, value, key=key)
                self.sent = i + 1
                ahead = i / self.rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)  # pacing the load, not synchronising
            await producer.flush()
        finally:
            await producer.stop()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def topic_names(bootstrap: str) -> list[str]:
    """Every topic on the broker, sorted."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return sorted(await admin.list_topics())
    finally:
        await admin.close()


async def end_offsets(bootstrap: str, topics: list[str]) -> dict[Any, int]:
    """The end offset of every partition of `topics` (TopicPartition -> offset), committed
    or not: anything written counts (the "wrote nothing there" checks)."""
    from paysaga.streams.app.kafka_io import consumer, partitions

    probe = consumer(bootstrap, isolation="read_uncommitted")
    await probe.start()
    try:
        tps = [tp for t in topics for tp in await partitions(probe, t, timeout=5.0)]
        return dict(await probe.end_offsets(tps)) if tps else {}
    finally:
        await probe.stop()
