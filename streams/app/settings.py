"""Settings for every paysaga process, read from `PAYSAGA_*` environment variables.

One model so that the worker, the CLI, the simulators and the tests agree on names and
defaults; the CLI overlays its options on top of what the environment says.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from paysaga.domain.breaker import BreakerConfig
from paysaga.domain.retry import DEFAULT_ATTEMPTS, DEFAULT_VARIANTS, RetryPolicy
from paysaga.streams.engine.assignor import is_endpoint

ENV_PREFIX = "PAYSAGA_"
DAY_MS = 24 * 3600 * 1000


#: The gateway breaker's defaults here: resilience4j's, and a half-open trial undecided
#: after 2 minutes opens again (its safety net; docs/retries.md#the-circuit-breaker).
BREAKER_DEFAULTS = BreakerConfig(max_half_open_ms=120_000)


class Settings(BaseModel):
    """Everything a paysaga process needs to know about its environment."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers")
    app_id: str = Field("paysaga", description="Faust application id (consumer group)")
    topic_prefix: str = Field("", description="prefix of every topic name (isolation)")
    input_topic_prefix: str | None = Field(
        None,
        description="prefix of the input topics when they differ from topic_prefix (a replay "
        "reads the live inputs and writes only its own prefixed topics); None: topic_prefix",
    )
    partitions: int = Field(3, ge=1, description="partition count of every payment topic")
    replication_factor: int = Field(1, ge=1)
    data_dir: Path = Field(Path("data"), description="where worker state lives")
    web_host: str = Field("127.0.0.1", description="web views bind address (loopback)")
    web_port: int = Field(6066, ge=0, le=65535, description="0 picks a free port")
    web_token: str | None = Field(None, description="bearer token required off loopback")
    web_advertised: str | None = Field(
        None, description="host:port other workers reach this one's views at (forwarded "
        "queries, Kafka Streams' application.server); None: web_host:web_port",
    )  # fmt: skip
    web_forward_timeout_ms: int = Field(
        2_000, ge=1, description="how long a view waits for the worker it forwarded to"
    )
    api_max_wait_ms: int = Field(
        30_000, ge=0, le=600_000,
        description="the longest `?wait=MS` a payments API write may ask for (docs/api.md)",
    )  # fmt: skip
    processing_guarantee: Literal["exactly_once"] = Field(
        "exactly_once", description="paysaga's engine: outputs, changelog, offsets in one txn"
    )
    topology: str = Field(
        "paysaga.streams.app.topology:paysaga_topology", description="module:factory of agents"
    )
    max_batch: int = Field(2000, ge=1, description="records fetched per engine batch")
    initiated_retention_ms: int = Field(7 * DAY_MS, description="payment.initiated retention")
    lifecycle_retention_ms: int = Field(-1, description="audit topics; -1 keeps forever")
    dlq_retention_ms: int = Field(-1)
    idempotency_ttl_ms: int = Field(DAY_MS, ge=DAY_MS, description="idempotency key lifetime")
    auth_window_ms: int = Field(
        7 * DAY_MS, ge=1, description="uncaptured authorizations are voided after (event time)"
    )
    command_timeout_ms: int = Field(
        10_000, ge=1, description="an unanswered command's outcome is unknown after this"
    )
    retry_attempts: str = Field(
        DEFAULT_ATTEMPTS, description="retries per retry level, comma-separated (docs/retries.md)"
    )
    retry_variants: str = Field(
        DEFAULT_VARIANTS,
        description="A/B retry strategies, NAME:WEIGHT:DELAY_MS,... per level, ';'-separated; "
        "the first is the control",
    )
    breaker: str = Field(
        BREAKER_DEFAULTS.spec(),
        description="the gateway circuit breaker per saga task: threshold=PCT,window=CALLS,"
        "min=CALLS,wait_ms=MS,half_open=CALLS,half_open_max_ms=MS (any subset; docs/retries.md)",
    )
    punctuate_ms: int = Field(500, ge=10, description="how often timers are checked")
    engine_slice_ms: float = Field(
        1.0, ge=0, description="how long a batch's agents run before the event loop gets a "
        "turn (views, heartbeats, other tasks); 0: each batch at once",
    )  # fmt: skip
    engine_commit_interval_ms: float = Field(
        0.0, ge=0, le=1_000, description="a task starts a transaction at most this often: "
        "records arriving sooner wait for the next (less CPU at moderate load, up to about "
        "twice this of latency per hop); 0: as soon as the last one committed",
    )  # fmt: skip
    idle_ms: int = Field(
        5_000,
        ge=100,
        description="a partition without input this long has its stream time follow the "
        "wall clock, this far behind (the idle policy, written as ticks a replay reproduces)",
    )
    session_timeout_ms: int = Field(
        10_000,
        ge=6_000,
        le=1_800_000,
        description="a worker silent this long loses its partitions to the others (the "
        "broker's group.min.session.timeout.ms, 6 s, and group.max.session.timeout.ms, "
        "30 min, by default, are the bounds)",
    )
    rocksdb_block_cache_bytes: int = Field(64 * 1024 * 1024, ge=1024 * 1024)
    rocksdb_memtable_bytes: int = Field(64 * 1024 * 1024, ge=1024 * 1024)
    rocksdb_write_buffer_bytes: int = Field(8 * 1024 * 1024, ge=1024 * 1024)
    recon_window_ms: int = Field(
        3_600_000, ge=1, description="reconciliation windows per merchant and currency (event time)"
    )
    recon_grace_ms: int = Field(
        2 * 3_600_000, ge=0, description="how late the bank may be before a window closes"
    )
    recon_retention_ms: int = Field(
        7 * 24 * 3_600_000, ge=0,
        description="how long a closed reconciliation window is kept for late arrivals",
    )  # fmt: skip
    recon_tolerance_days: int = Field(
        1, ge=0, description="value-date tolerance of matching by amount (tier 2)"
    )
    settlement_batch_ms: int = Field(
        24 * 3_600_000, ge=1,
        description="settlement batches per merchant and currency (event time): docs/settlement.md",
    )  # fmt: skip
    settlement_cutoff_ms: int = Field(
        3_600_000, ge=0, description="how long after its end a batch is submitted"
    )
    settlement_retention_ms: int = Field(
        7 * 24 * 3_600_000, ge=0,
        description="how long a submitted batch's entries stay in the settlement table",
    )  # fmt: skip
    gc_gen0_threshold: int = Field(
        50_000,
        ge=0,
        description="allocations between the garbage collector's young collections (Python's "
        "default is 700; 0 keeps it): docs/architecture.md#gc",
    )
    log_level: str = Field("WARNING")

    @field_validator("retry_variants")
    @classmethod
    def _retry_policy(cls, v: str, info: Any) -> str:
        RetryPolicy.parse(info.data.get("retry_attempts", DEFAULT_ATTEMPTS), v)  # or ValueError
        return v

    @field_validator("breaker")
    @classmethod
    def _breaker(cls, v: str) -> str:
        BreakerConfig.parse(v, BREAKER_DEFAULTS)  # or ValueError, naming the bad part
        return v

    @field_validator("web_advertised")
    @classmethod
    def _advertised(cls, v: str | None) -> str | None:
        if v is not None and not is_endpoint(v):
            raise ValueError(f"web_advertised {v!r}: expected host:port")
        return v

    @property
    def web_endpoint(self) -> str:
        """Where other workers forward queries for this worker's tasks: `web_advertised`;
        else the bind address, or this machine's hostname when bound to every interface
        (0.0.0.0 is nobody's address: in a container, the hostname is what its peers
        resolve)."""
        if self.web_advertised:
            return self.web_advertised
        host = self.web_host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        return f"{host}:{self.web_port}"

    def breaker_config(self) -> BreakerConfig:
        return BreakerConfig.parse(self.breaker, BREAKER_DEFAULTS)

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy.parse(self.retry_attempts, self.retry_variants)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from `PAYSAGA_<FIELD>` variables, then explicit overrides.

        Overrides whose value is None are ignored so CLI options left unset fall back to
        the environment and then to the defaults.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None and raw != "":
                values[name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
