"""Captures and bank lines sent through the real broker, and committed reports read back.

Windows are short (seconds) and every event time is set ahead of the wall clock, in a
window no partition's stream time has reached yet, so a window holds exactly what the test
sent to it and closes once the worker's idle policy moves stream time past its end + grace.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from aiokafka import AIOKafkaProducer

from paysaga.domain.reconciliation import utc_date
from paysaga.schemas.codec import AvroCodec
from paysaga.schemas.registry import SchemaRegistry
from paysaga.streams.app.kafka_io import read_all
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import Topics
from paysaga.streams.engine.partitioner import partition_for
from tests.support import WorkerProcess

CODEC = AvroCodec(SchemaRegistry())


def new_id() -> str:
    return str(uuid.uuid4())


class ReconWorld:
    """The gateway's captures and the bank's statement lines, as one test sends them."""

    def __init__(self, settings: Settings, worker: WorkerProcess | None = None) -> None:
        self.settings = settings
        self.t = Topics(settings.topic_prefix)
        self.pending: list[tuple[str, bytes, bytes]] = []
        #: The worker, for its web views (end-to-end tests that start one).
        self.worker = worker

    def next_window(self, ahead_ms: int = 3_000) -> int:
        """The start of a window at least `ahead_ms` in the future."""
        size = self.settings.recon_window_ms
        at = int(time.time() * 1000) + ahead_ms
        return at - at % size + size

    def capture(self, merchant: str, n: str, amount: int, at: int, currency: str = "EUR",
                capture_id: str | None = None) -> dict[str, Any]:  # fmt: skip
        e = {"event_id": new_id(), "occurred_at": at, "payment_id": f"pay-{n}",
             "correlation_id": f"ord-{n}", "causation_id": None, "amount_minor": amount,
             "currency": currency, "merchant_id": merchant, "gateway_reference": f"gw-{n}",
             "capture_id": capture_id or f"cap-{n}", "command_id": None}  # fmt: skip
        self.pending.append((self.t.captured, f"pay-{n}".encode(),
                             CODEC.encode("PaymentCaptured", e)))  # fmt: skip
        return e

    def line(self, merchant: str, n: str, ref: str | None, amount: int, at: int,
             currency: str = "EUR", **extra: Any) -> dict[str, Any]:  # fmt: skip
        line = {"event_id": new_id(), "occurred_at": at, "statement_id": f"st-{merchant}",
                "line_id": n, "merchant_id": merchant, "payment_reference": ref,
                "amount_minor": amount, "currency": currency, "value_date": utc_date(at),
                "booking_date": utc_date(at), **extra}  # fmt: skip
        self.pending.append((self.t.bank_statements, merchant.encode(),
                             CODEC.encode("BankStatementLine", line)))  # fmt: skip
        return line

    def flush(self) -> None:
        """Send everything queued, in order, partitioned as paysaga partitions."""
        items, self.pending = self.pending, []

        async def go() -> None:
            producer = AIOKafkaProducer(bootstrap_servers=self.settings.bootstrap)
            await producer.start()
            try:
                for topic, key, value in items:
                    part = partition_for(key, self.settings.partitions)
                    await producer.send(topic, value, key=key, partition=part)
                await producer.flush()
            finally:
                await producer.stop()

        asyncio.run(go())

    def _read(self, topic: str, schema: str, merchant: str | None) -> list[dict[str, Any]]:
        records = asyncio.run(read_all(self.settings.bootstrap, topic))
        out = [CODEC.decode(r.value, schema) for r in records if r.value is not None]
        return [o for o in out if merchant is None or o["merchant_id"] == merchant]

    def reports(self, merchant: str | None = None) -> list[dict[str, Any]]:
        return self._read(self.t.recon_reports, "ReconciliationReport", merchant)

    def discrepancies(self, merchant: str | None = None) -> list[dict[str, Any]]:
        return self._read(self.t.recon_discrepancies, "ReconciliationDiscrepancy", merchant)
