"""A local single-node Apache Kafka (KRaft, broker+controller) for development and tests.

The jars come from Maven Central through `mvn` into a cache reused across runs, so a fresh
machine needs only Java 17 and Maven. The node is bound to loopback, has replication factor
1 everywhere (transactions included) and no initial rebalance delay, which is what a
single-machine exactly-once setup needs. Its JVM is sized for sharing a small machine with
the workers (see `LocalBroker.up`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from paysaga.streams.app.net import free_port

KAFKA_VERSION = os.environ.get("PAYSAGA_KAFKA_VERSION", "4.1.0")
ARTIFACTS = ("kafka_2.13", "kafka-server", "kafka-storage", "kafka-clients")
DEFAULT_PORT = 9092


class BrokerError(RuntimeError):
    """The local broker could not be set up, started or reached."""


def cache_dir() -> Path:
    """Where resolved jars live; shared by every checkout on the machine."""
    base = os.environ.get("PAYSAGA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")), "paysaga"
    )
    return Path(base) / f"kafka-{KAFKA_VERSION}"


def _pom() -> str:
    deps = "".join(
        f"<dependency><groupId>org.apache.kafka</groupId><artifactId>{a}</artifactId>"
        f"<version>{KAFKA_VERSION}</version></dependency>"
        for a in ARTIFACTS
    )
    # Kafka's core logs through slf4j 1.7; reload4j gives it a plain file appender.
    deps += (
        "<dependency><groupId>org.slf4j</groupId><artifactId>slf4j-reload4j</artifactId>"
        "<version>1.7.36</version></dependency>"
    )
    return (
        '<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>'
        "<groupId>io.paysaga</groupId><artifactId>local-kafka</artifactId><version>1</version>"
        f"<dependencies>{deps}</dependencies></project>"
    )


def ensure_jars(log: Callable[[str], object] = print) -> Path:
    """Resolve the broker jars once (under a file lock) and return the lib directory."""
    root = cache_dir()
    lib = root / "lib"
    if (root / "READY").exists():
        return lib
    if shutil.which("mvn") is None:
        raise BrokerError("mvn is not on PATH: install Maven (apt-get install maven)")
    if shutil.which("java") is None:
        raise BrokerError("java is not on PATH: install a JDK 17 (apt-get install openjdk-17-jdk)")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / "READY").exists():
            return lib
        log(f"resolving Apache Kafka {KAFKA_VERSION} jars from Maven Central ...")
        work = root / f"resolve-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        (work / "pom.xml").write_text(_pom())
        cmd = ["mvn", "-q", "-B", "dependency:copy-dependencies", "-DoutputDirectory=lib"]
        proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise BrokerError(f"mvn could not resolve Kafka jars:\n{proc.stdout[-2000:]}")
        shutil.rmtree(lib, ignore_errors=True)
        (work / "lib").rename(lib)
        shutil.rmtree(work, ignore_errors=True)
        (root / "READY").write_text(KAFKA_VERSION)
    return lib


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


@dataclass
class LocalBroker:
    """One KRaft node in `data_dir`, listening on 127.0.0.1:`port`."""

    data_dir: Path
    port: int = DEFAULT_PORT
    heap: str = "768m"

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "broker.pid"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "server.log"

    def _properties(self, controller_port: int) -> str:
        logs = self.data_dir / "kraft-logs"
        return "\n".join(
            [
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.voters=1@127.0.0.1:{controller_port}",
                f"listeners=PLAINTEXT://127.0.0.1:{self.port},"
                f"CONTROLLER://127.0.0.1:{controller_port}",
                f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
                "controller.listener.names=CONTROLLER",
                "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                "inter.broker.listener.name=PLAINTEXT",
                f"log.dirs={logs}",
                "num.partitions=1",
                "auto.create.topics.enable=false",
                "default.replication.factor=1",
                "min.insync.replicas=1",
                "offsets.topic.replication.factor=1",
                "offsets.topic.num.partitions=10",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "transaction.state.log.num.partitions=10",
                "share.coordinator.state.topic.replication.factor=1",
                "share.coordinator.state.topic.min.isr=1",
                "group.initial.rebalance.delay.ms=0",
                "log.retention.check.interval.ms=60000",
                "",
            ]
        )

    def _log4j(self) -> str:
        return "\n".join(
            [
                "log4j.rootLogger=INFO, F",
                "log4j.logger.kafka.request.logger=WARN",
                "log4j.logger.state.change.logger=WARN",
                "log4j.appender.F=org.apache.log4j.FileAppender",
                f"log4j.appender.F.File={self.log_file}",
                "log4j.appender.F.layout=org.apache.log4j.PatternLayout",
                "log4j.appender.F.layout.ConversionPattern=[%d] %p %m (%c)%n",
                "",
            ]
        )

    def pid(self) -> int | None:
        """The broker's pid if its process is alive."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def up(self, timeout: float = 60.0, log: Callable[[str], object] = print) -> float:
        """Start the node (formatting storage the first time); return seconds to ready."""
        if self.pid() is not None:
            if wait_ready(self.bootstrap, 10):
                return 0.0
            raise BrokerError(f"broker pid {self.pid()} runs but {self.bootstrap} is not ready")
        if port_open(self.port):
            raise BrokerError(f"port {self.port} is taken by another process")
        lib = ensure_jars(log)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        controller_port = free_port()
        props = self.data_dir / "server.properties"
        props.write_text(self._properties(controller_port))
        (self.data_dir / "log4j.properties").write_text(self._log4j())
        java = [
            "java",
            f"-Xmx{self.heap}",
            f"-Xms{self.heap}",
            # Kafka's own start script's collector settings (short young-collection pauses).
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:InitiatingHeapOccupancyPercent=35",
            # C1 only. This node shares a small machine with the workers it serves, and C2
            # kept a whole core busy compiling for minutes after start-up (measured at 1,000
            # events/s on 2 cores: the C2 compiler thread at 43-58 % of a core, more than
            # the request handling itself). That CPU came out of the workers' transactions:
            # `paysaga bench`, same machine, paysaga p99 161-176 ms with C2, 71-95 ms with
            # C1 only, the baseline loop likewise; throughput within the noise.
            "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{self.data_dir / 'log4j.properties'}",
            "-cp",
            f"{lib}/*",
        ]
        started = time.monotonic()
        if not (self.data_dir / "kraft-logs" / "meta.properties").exists():
            cluster = uuid.uuid4().hex[:22]
            fmt = subprocess.run(
                [
                    *java,
                    "kafka.tools.StorageTool",
                    "format",
                    "-t",
                    cluster,
                    "-c",
                    str(props),
                    "--standalone",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if fmt.returncode != 0:
                raise BrokerError(f"formatting KRaft storage failed:\n{fmt.stdout}{fmt.stderr}")
        out = open(self.data_dir / "broker.stdout", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            [*java, "kafka.Kafka", str(props)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.pid_file.write_text(str(proc.pid))
        deadline = started + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BrokerError(f"broker exited with {proc.returncode}; see {self.log_file}")
            if wait_ready(self.bootstrap, 1.0):
                return time.monotonic() - started
        self.down()
        raise BrokerError(f"broker not ready within {timeout:.0f}s; see {self.log_file}")

    def down(self, timeout: float = 30.0) -> bool:
        """Stop the node: SIGTERM for a clean shutdown, SIGKILL if it hangs."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            if self.pid() is None:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return True

    def status(self) -> str:
        pid = self.pid()
        if pid is None:
            return f"down (data dir {self.data_dir})"
        ready = wait_ready(self.bootstrap, 2.0)
        return f"{'up' if ready else 'starting'} pid={pid} bootstrap={self.bootstrap}"


def wait_ready(bootstrap: str, timeout: float) -> bool:
    """True once the broker answers a metadata request with itself as a live broker."""
    import asyncio

    from aiokafka.admin import AIOKafkaAdminClient

    async def probe() -> bool:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
        try:
            await asyncio.wait_for(admin.start(), timeout)
            cluster = await asyncio.wait_for(admin.describe_cluster(), timeout)
            return bool(cluster.get("brokers"))
        except Exception:
            return False
        finally:
            with contextlib.suppress(Exception):
                await admin.close()

    host, _, port = bootstrap.rpartition(":")
    if not port_open(int(port), host or "127.0.0.1"):
        time.sleep(min(timeout, 0.2))
        return False
    return asyncio.run(probe())


if __name__ == "__main__":  # pragma: no cover - manual smoke test
    b = LocalBroker(Path(sys.argv[1]), int(sys.argv[2]))
    print(b.up())
