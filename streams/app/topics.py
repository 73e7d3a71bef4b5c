"""Every paysaga topic, declared once, and the idempotent `topics create` that applies them.

Every topic keyed by payment_id gets the same partition count (`Settings.partitions`):
the payments table is fed by several of them, and co-partitioning only holds when their
partition counts agree. An existing topic with another count is reported, never ignored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.structs import TopicPartition

from paysaga.streams.app.kafka_io import consumer
from paysaga.streams.app.settings import Settings

#: paysaga's internal hops (repartition, accepted) are kept by the time they were written,
#: not by the event time their records carry: a replay of month-old input would otherwise
#: write records the broker's time-based retention deletes before they are read
#: (docs/traps.md#event-time-timestamps-and-retention). Readers take event time from the
#: payload.
APPEND_TIME = {"message.timestamp.type": "LogAppendTime"}


@dataclass(frozen=True)
class TopicSpec:
    """One topic: its name, what it carries, how it is partitioned and kept."""

    name: str
    value: str
    key: str = "payment_id"
    retention_ms: int = -1
    cleanup_policy: str = "delete"
    partitions: int | None = None  # None: the shared payment partition count
    extra: dict[str, str] = field(default_factory=dict)

    def config(self) -> dict[str, str]:
        return {
            "cleanup.policy": self.cleanup_policy,
            **(
                {} if self.cleanup_policy == "compact" else {"retention.ms": str(self.retention_ms)}
            ),
            **self.extra,
        }


class Topics:
    """Topic names for one deployment, so code never spells a topic name twice.

    `prefix` isolates a deployment's topics on a shared cluster (a replay's output topics,
    or one test among many on the same broker).
    """

    def __init__(self, prefix: str = "", input_prefix: str | None = None) -> None:
        self.prefix = prefix
        #: Input topics (what upstream, the gateway and the services write) may live under
        #: another prefix than what this deployment writes: a replay reads the live inputs
        #: and writes only its own topics.
        inp = prefix if input_prefix is None else input_prefix
        self.input_prefix = inp
        self.initiated = inp + "payment.initiated"
        #: Upstream's capture / refund / cancel requests on existing payments.
        self.requests = inp + "payment.requests"
        self.authorized = inp + "payment.authorized"
        self.captured = inp + "payment.captured"
        self.failed = inp + "payment.failed"
        self.reversed = inp + "payment.reversed"
        self.settled = inp + "payment.settled"
        self.inventory_events = inp + "inventory.events"
        self.shipping_events = inp + "shipping.events"
        self.bank_statements = inp + "bank.statements"
        #: Stream-time ticks of the idle policy (written by the live application, read back
        #: as input; a replay reads the live ones).
        self.stream_time = inp + "paysaga.stream-time"
        #: Operators' resumes of saga commands given up (SagaResume, written by `paysaga dlq
        #: redrive` from review letters; docs/dlq.md#resuming-a-review): recorded input, so
        #: a replay reads the live ones.
        self.saga_resume = inp + "paysaga.saga.resume"
        #: payment.initiated re-keyed by idempotency scope (merchant_id, idempotency_key)
        #: with paysaga's partitioner (internal): where the idempotency table decides.
        self.initiated_repartition = prefix + "paysaga.payment.initiated.repartition"
        #: Accepted requests (new or replayed), keyed by payment_id (internal): saga input.
        self.accepted = prefix + "paysaga.payment.accepted"
        #: Saga inputs found on a partition other than their payment_id's (internal).
        self.saga_repartition = prefix + "paysaga.saga.repartition"
        #: Reconciliation inputs found on a partition other than their merchant's (internal).
        self.recon_repartition = prefix + "paysaga.recon.repartition"
        #: SETTLE commands the saga hands to its merchant's batch, keyed by merchant (internal).
        self.settlement_requests = prefix + "paysaga.settlement.requests"
        self.commands = prefix + "payment.commands"
        self.status = prefix + "payment.status"
        self.dlq = prefix + "payment.dlq"
        #: Dead letters `paysaga dlq redrive` refused to redrive again (docs/dlq.md#quarantine).
        self.dlq_quarantine = prefix + "payment.dlq.quarantine"
        #: The redrive ledger: one record per DLQ partition:offset redriven or quarantined,
        #: written in the redrive's transaction (internal, compacted; docs/dlq.md#the-ledger).
        self.dlq_redrives = prefix + "paysaga.dlq.redrives"
        self.inventory_commands = prefix + "inventory.commands"
        self.shipping_commands = prefix + "shipping.commands"
        self.recon_reports = prefix + "reconciliation.reports"
        self.recon_discrepancies = prefix + "reconciliation.discrepancies"
        self.settlement_batches = prefix + "settlement.batches"
        #: The saga tasks' circuit breakers on the gateway: one record per transition.
        self.breaker = prefix + "paysaga.breaker"
        #: What each task transaction processed: the replay's input (streams/engine/
        #: journal.py, docs/replay.md#the-journal). Internal, kept like the audit topics.
        self.journal = prefix + "paysaga.journal"

    @property
    def inputs(self) -> tuple[str, ...]:
        """The topics other systems write and this deployment only reads."""
        return (self.initiated, self.requests, self.authorized, self.captured, self.failed,
                self.reversed, self.settled, self.inventory_events, self.shipping_events,
                self.bank_statements, self.stream_time, self.saga_resume)  # fmt: skip

    def retry(self, level: int) -> str:
        """Where the retries scheduled at `level` (1-based) are recorded (docs/retries.md)."""
        return f"{self.prefix}payment.retry.{level}"


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """The declarative topic table (docs/contract.md#topics)."""
    audit = settings.lifecycle_retention_ms
    t = Topics(settings.topic_prefix, settings.input_topic_prefix)
    specs = [
        TopicSpec(t.initiated, "PaymentInitiated", retention_ms=settings.initiated_retention_ms),
        TopicSpec(
            t.initiated_repartition,
            "PaymentInitiated (repartitioned by idempotency scope)",
            key="merchant_id + idempotency_key",
            retention_ms=settings.initiated_retention_ms,
            extra=APPEND_TIME,
        ),
        TopicSpec(
            t.accepted,
            "PaymentInitiated accepted by intake (header paysaga.intake)",
            retention_ms=settings.initiated_retention_ms,
            extra=APPEND_TIME,
        ),
        TopicSpec(
            t.saga_repartition,
            "saga inputs re-keyed (header paysaga.source)",
            retention_ms=settings.initiated_retention_ms,
            extra=APPEND_TIME,
        ),
        TopicSpec(
            t.recon_repartition,
            "reconciliation inputs re-keyed by merchant (header paysaga.source)",
            key="merchant_id",
            retention_ms=settings.initiated_retention_ms,
            extra=APPEND_TIME,
        ),
        TopicSpec(
            t.settlement_requests,
            "PaymentCommand SETTLE for the merchant's settlement batch",
            key="merchant_id",
            retention_ms=settings.initiated_retention_ms,
            extra=APPEND_TIME,
        ),
        TopicSpec(t.requests, "PaymentRequest", retention_ms=audit),
        *(
            TopicSpec(name, value, retention_ms=audit)
            for name, value in (
                (t.authorized, "PaymentAuthorized"),
                (t.captured, "PaymentCaptured"),
                (t.failed, "PaymentFailed"),
                (t.reversed, "PaymentReversed"),
                (t.settled, "PaymentSettled"),
                (t.commands, "PaymentCommand"),
                (t.status, "PaymentStatusChanged"),
                (t.inventory_commands, "InventoryCommand"),
                (t.inventory_events, "InventoryEvent"),
                (t.shipping_commands, "ShippingCommand"),
                (t.shipping_events, "ShippingEvent"),
            )
        ),
        *(
            TopicSpec(t.retry(level), "RetryScheduled", retention_ms=audit)
            for level in range(1, settings.retry_policy().levels + 1)
        ),
        TopicSpec(t.breaker, "BreakerTransition", key="task partition", retention_ms=audit),
        TopicSpec(
            t.journal,
            "what each task transaction processed (JSON, docs/replay.md#the-journal)",
            key="none (the task's partition)",
            retention_ms=audit,
        ),
        TopicSpec(t.saga_resume, "SagaResume (redriven review letters)", retention_ms=audit),
        TopicSpec(t.dlq, "original bytes + error headers", retention_ms=settings.dlq_retention_ms),
        TopicSpec(
            t.dlq_quarantine,
            "dead letters past the redrive cap, with their headers",
            key="as on payment.dlq",
            retention_ms=settings.dlq_retention_ms,
        ),
        TopicSpec(
            t.dlq_redrives,
            "redrive ledger (JSON: redriven or quarantined)",
            key="<dlq partition>:<dlq offset>",
            cleanup_policy="compact",
            partitions=1,
        ),
        TopicSpec(
            t.stream_time,
            "stream-time ticks of idle partitions (idle policy)",
            key="none (one per partition)",
            retention_ms=audit,
        ),
        TopicSpec(t.bank_statements, "BankStatementLine", key="merchant_id", retention_ms=audit),
        TopicSpec(t.recon_reports, "ReconciliationReport", key="merchant_id", retention_ms=audit),
        TopicSpec(
            t.recon_discrepancies,
            "ReconciliationDiscrepancy",
            key="merchant_id",
            retention_ms=audit,
        ),
        TopicSpec(t.settlement_batches, "SettlementBatch", key="merchant_id", retention_ms=audit),
    ]
    return specs + internal_specs(settings)


def changelog_topic(settings: Settings, table: str) -> str:
    return f"{settings.app_id}-{table}-changelog"


def internal_specs(settings: Settings) -> list[TopicSpec]:
    """The app's own topics: one compacted changelog per table, co-partitioned with inputs."""
    from paysaga.streams.app.topology import load_topology

    return [
        TopicSpec(changelog_topic(settings, table), "table changelog", cleanup_policy="compact")
        for table in load_topology(settings).tables
    ]


def partitions_of(spec: TopicSpec, settings: Settings) -> int:
    return spec.partitions or settings.partitions


async def create_topics(
    settings: Settings,
    specs: list[TopicSpec] | None = None,
    log: Callable[[str], object] | None = print,
) -> dict[str, str]:
    """Create missing topics; check existing ones. Returns {topic: "created" | "exists"}.

    Raises RuntimeError listing every existing topic whose partition count differs from its
    declaration: silently living with it would break co-partitioning of the payments table.
    """
    specs = topic_specs(settings) if specs is None else specs
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        existing = await _partition_counts(admin)
        missing = [s for s in specs if s.name not in existing]
        result = {s.name: "exists" for s in specs if s.name in existing}
        if missing:
            new = [
                NewTopic(
                    name=s.name,
                    num_partitions=partitions_of(s, settings),
                    replication_factor=settings.replication_factor,
                    topic_configs=s.config(),
                )
                for s in missing
            ]
            resp = await admin.create_topics(new, validate_only=False)
            for name, code, *_ in resp.topic_errors:
                if code not in (0, 36):  # 36: TOPIC_ALREADY_EXISTS, a concurrent creator won
                    raise RuntimeError(f"creating topic {name} failed with error code {code}")
                result[name] = "created" if code == 0 else "exists"
        # Check the final state, not the listing taken before: a topic created meanwhile
        # (by another process, or not yet in the broker's metadata) is checked too.
        await _wait_for_metadata(admin, {s.name for s in specs})
        final = await _partition_counts(admin, [s.name for s in specs])
        wrong = [
            f"{s.name}: has {final.get(s.name)} partitions, declared {partitions_of(s, settings)}"
            for s in specs
            if final.get(s.name) != partitions_of(s, settings)
        ]
        if wrong:
            raise RuntimeError(
                "partition counts differ from the declaration (co-partitioning would break):\n  "
                + "\n  ".join(wrong)
            )
        if missing:
            await _wait_until_served(settings.bootstrap, final, [s.name for s in missing])
        existed = {name for name, how in result.items() if how == "exists"}
        for name, why in (await _short_retention(admin, specs, existed)).items():
            result[name] = f"exists, {why}"
            if log is not None:
                log(f"warning: {name} {why}")
        return result
    finally:
        await admin.close()


def retention_shortfall(declared: int, actual: int) -> bool:
    """Whether a topic keeps records for less time than declared (-1: forever)."""
    if declared < 0:
        return actual >= 0
    return 0 <= actual < declared


async def _short_retention(admin: AIOKafkaAdminClient, specs: list[TopicSpec],
                           existed: set[str]) -> dict[str, str]:  # fmt: skip
    """Existing topics kept shorter than declared (a created one has its declaration): the
    audit trail and replays reach back only that far (docs/replay.md)."""
    kept = [s for s in specs if s.name in existed and s.cleanup_policy == "delete"]
    if not kept:
        return {}
    resp = await admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, s.name) for s in kept])  # fmt: skip
    actual: dict[str, int] = {}
    for r in resp:
        for res in r.resources:
            values = {e[0]: e[1] for e in res[4]}
            if values.get("retention.ms") is not None:
                actual[res[3]] = int(values["retention.ms"])
    out = {}
    for s in kept:
        have = actual.get(s.name)
        if have is not None and retention_shortfall(s.retention_ms, have):
            want = "forever" if s.retention_ms < 0 else f"{s.retention_ms} ms"
            out[s.name] = (f"keeps records {have} ms, shorter than declared ({want}): the audit "
                           f"trail and replays reach back only that far")  # fmt: skip
    return out


async def _partition_counts(
    admin: AIOKafkaAdminClient, names: list[str] | None = None
) -> dict[str, int]:
    names = names if names is not None else await admin.list_topics()
    if not names:
        return {}
    described = await admin.describe_topics(list(names))
    return {d["topic"]: len(d["partitions"]) for d in described if d.get("error_code", 0) == 0}


async def _wait_for_metadata(
    admin: AIOKafkaAdminClient, names: set[str], timeout: float = 30.0
) -> None:
    """Wait until every topic has a leader for every partition, so producers can start."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        described = await admin.describe_topics(sorted(names))
        ready = all(
            d.get("error_code", 0) == 0 and all(p["leader"] >= 0 for p in d["partitions"])
            for d in described
        )
        if ready:
            return
        if loop.time() > deadline:
            raise RuntimeError(f"topics have no leaders after {timeout:.0f}s")
        await asyncio.sleep(0.1)


async def _wait_until_served(
    bootstrap: str, counts: dict[str, int], names: list[str], timeout: float = 30.0
) -> None:
    """Wait until each new partition's leader answers requests, not only the metadata.

    The controller names a leader before that broker has taken the partition on; a producer
    starting in that window gets NOT_LEADER answers and logs a retry warning per batch,
    which reads like a fault to whoever watches `make run`. A ListOffsets per partition is
    retried quietly by the client until the leader serves it.
    """
    probe = consumer(bootstrap, request_timeout_ms=int(timeout * 1000))
    await probe.start()
    try:
        tps = [TopicPartition(n, p) for n in names for p in range(counts[n])]
        await asyncio.wait_for(probe.end_offsets(tps), timeout)
    finally:
        await probe.stop()


async def describe_configs(settings: Settings, name: str) -> dict[str, str]:
    """A topic's effective configuration (used by tests and `topics create` reporting)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
    await admin.start()
    try:
        resp = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])
        entries = resp[0].resources[0][4]
        return {e[0]: e[1] for e in entries}
    finally:
        await admin.close()
