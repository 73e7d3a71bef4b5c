"""The paysaga Faust application: topics, tables, agents and web views wired together.

`create_app(settings)` is the one place the topology is assembled, so the worker, the tests
and the benchmark all run the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass

import faust

from paysaga.agents.intake import IntakeStep, register_intake
from paysaga.schemas.codec import AvroCodec
from paysaga.schemas.registry import SchemaRegistry
from paysaga.streams.settings import Settings
from paysaga.streams.topics import Topics
from paysaga.tables.payments import payments_table, rocksdb_options


@dataclass
class Paysaga:
    """The assembled application and the handles tests and views need."""

    settings: Settings
    app: faust.App
    codec: AvroCodec
    payments: faust.Table


def faust_broker_url(bootstrap: str) -> str:
    return ";".join(f"kafka://{hp.strip()}" for hp in bootstrap.split(",") if hp.strip())


def create_app(settings: Settings) -> Paysaga:
    """Build the Faust app for `settings` (nothing connects until the worker starts)."""
    app = faust.App(
        settings.app_id,
        broker=faust_broker_url(settings.bootstrap),
        store="rocksdb://",
        datadir=str(settings.data_dir),
        processing_guarantee=settings.processing_guarantee,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        topic_allow_declare=False,
        consumer_auto_offset_reset="earliest",
        key_serializer="raw",
        value_serializer="raw",
        producer_linger=0.005,
        rocksdb_options=rocksdb_options(settings),
        web_enabled=True,
        web_bind=settings.web_host,
        web_port=settings.web_port,
        web_tables_enabled=False,
        web_graph_enabled=False,
        web_stats_enabled=False,
        web_metrics_enabled=False,
        autodiscover=False,
    )
    codec = AvroCodec(SchemaRegistry())
    payments = payments_table(app, settings)
    names = Topics(settings.topic_prefix)
    topic = app.topic
    source = topic(names.initiated, key_type=bytes, value_type=bytes, allow_empty=True)
    status = topic(names.status, key_type=bytes, value_type=bytes)
    dlq = topic(names.dlq, key_type=bytes, value_type=bytes)
    register_intake(app, IntakeStep(codec), source, status, dlq, payments)
    from paysaga.streams.web import register_views

    register_views(app, settings, payments)
    return Paysaga(settings, app, codec, payments)
