"""The paysaga application: a Faust app plus the exactly-once engine beneath its agents.

`create_app(settings)` is the one place the topology is assembled, so the worker, the tests
and the benchmark all run the same thing. Faust runs in producer-only mode: it provides the
worker lifecycle, the web views and the service tree, while consumption, state and
transactions belong to `ExactlyOnceEngine` (why:
docs/traps.md#faust-exactly-once-sends-outputs-outside-the-transaction).
"""

from __future__ import annotations

from dataclasses import dataclass

import faust
from aiokafka.structs import TopicPartition

from paysaga.domain.card import redact
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import Topics, changelog_topic
from paysaga.streams.app.topology import load_topology
from paysaga.streams.engine import EngineConfig, ExactlyOnceEngine, StartAt
from paysaga.streams.engine.config import ReplaySource
from paysaga.streams.engine.metrics import MetricSink
from paysaga.tables.store import StoreManager, StoreOptions


@dataclass
class Paysaga:
    """The assembled application and the handles views, tests and benchmarks need."""

    settings: Settings
    app: faust.App
    engine: ExactlyOnceEngine


def faust_broker_url(bootstrap: str) -> str:
    return ";".join(f"kafka://{hp.strip()}" for hp in bootstrap.split(",") if hp.strip())


def store_manager(settings: Settings) -> StoreManager:
    return StoreManager(
        settings.data_dir / settings.app_id / "state",
        StoreOptions(
            block_cache_bytes=settings.rocksdb_block_cache_bytes,
            memtable_bytes=settings.rocksdb_memtable_bytes,
            write_buffer_bytes=settings.rocksdb_write_buffer_bytes,
        ),
    )


def create_engine(
    settings: Settings,
    start: dict[TopicPartition, StartAt] | None = None,
    stop: dict[TopicPartition, int] | None = None,
    metrics: MetricSink | None = None,
    endpoint: str | None = None,
    replay: ReplaySource | None = None,
    group_id: str | None = None,
) -> ExactlyOnceEngine:
    """The engine running `settings.topology`; `start` and `stop` bound a replay's input,
    `replay` names the live journal it re-executes (docs/replay.md), `group_id` a group
    other than the application's (a reset's rebuild)."""
    topology = load_topology(settings)
    names = Topics(settings.topic_prefix, settings.input_topic_prefix)
    config = EngineConfig(
        bootstrap=settings.bootstrap,
        app_id=settings.app_id,
        group_id=group_id,
        dlq_topic=names.dlq,
        changelog=lambda table: changelog_topic(settings, table),
        max_batch=settings.max_batch,
        punctuate_ms=settings.punctuate_ms,
        slice_ms=settings.engine_slice_ms,
        commit_interval_ms=settings.engine_commit_interval_ms,
        session_timeout_ms=settings.session_timeout_ms,
        redact=redact,
        tick_topic=names.stream_time if topology.uses_stream_time else None,
        idle_ms=settings.idle_ms,
        write_ticks=settings.input_topic_prefix in (None, settings.topic_prefix),
        start=start or {},
        stop=stop or {},
        endpoint=endpoint,
        journal_topic=names.journal if replay is None else None,
        replay=replay,
    )
    return ExactlyOnceEngine(config, topology, store_manager(settings), metrics)


def create_app(settings: Settings) -> Paysaga:
    """Build the app for `settings` (nothing connects until the worker starts)."""
    app = faust.App(
        f"{settings.app_id}-web",
        broker=faust_broker_url(settings.bootstrap),
        datadir=str(settings.data_dir / settings.app_id / "faust"),
        topic_allow_declare=False,
        web_enabled=True,
        web_bind=settings.web_host,
        web_port=settings.web_port,
        web_tables_enabled=False,
        web_graph_enabled=False,
        web_stats_enabled=False,
        web_metrics_enabled=False,
        web_router_enabled=False,
        autodiscover=False,
    )
    app.producer_only = True  # no Faust consumer group: the engine owns consumption
    from paysaga.streams.ops.metrics import LoopWatch, PrometheusSink, WorkerCollector
    from paysaga.streams.ops.web import register_views

    sink = PrometheusSink(tuple(v.name for v in settings.retry_policy().variants))
    engine = create_engine(settings, metrics=sink, endpoint=settings.web_endpoint)
    sink.registry.register(WorkerCollector(engine, settings.breaker_config()))
    app.task(LoopWatch(sink.registry).run)
    register_views(app, settings, engine, sink.registry)
    return Paysaga(settings, app, engine)
