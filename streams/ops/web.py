"""Operator web views over the tables (Faust web), answered by any worker: a keyed view is
served by the worker that owns its task, forwarded there once, or 503 while it moves
(streams/ops/routing.py).

Payment data is not public: the server binds to loopback by default, Faust's built-in
`/table` dumps are off, and when `PAYSAGA_WEB_TOKEN` is set every view but `/health`
requires `Authorization: Bearer <token>` (`/ready/` too: its failure texts and counters are
for operators); `/health` answers nothing but `{"status": "ok"}`. Binding off loopback
without a token is refused.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable
from typing import Any, cast

import faust
from faust.web import Request, Response, View
from prometheus_client import CollectorRegistry

from paysaga.streams.app.settings import Settings
from paysaga.streams.engine import ExactlyOnceEngine
from paysaga.streams.engine.partitioner import partition_for
from paysaga.streams.ops.metrics import CONTENT_TYPE, generate
from paysaga.streams.ops.routing import (
    H_HOP,
    H_PARTITION,
    H_SERVED_BY,
    Forwarder,
    unavailable,
)
from paysaga.tables.breaker import BREAKER, describe
from paysaga.tables.payments import PAYMENTS
from paysaga.tables.store import PartitionStore


class WebConfigError(ValueError):
    """The web settings would expose payment data."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_web_settings(settings: Settings) -> None:
    if not is_loopback(settings.web_host) and not settings.web_token:
        raise WebConfigError(
            f"web_host {settings.web_host} is not loopback: set PAYSAGA_WEB_TOKEN to expose views"
        )


def register_views(app: faust.App, settings: Settings, engine: ExactlyOnceEngine,
                   registry: CollectorRegistry | None = None) -> None:  # fmt: skip
    """Register /health, /ready, /metrics and /payments/{payment_id}/ on `app`."""
    check_web_settings(settings)
    token = settings.web_token
    breaker_config = settings.breaker_config()
    me = settings.web_endpoint
    forwarder = Forwarder(me, settings.web_forward_timeout_ms)

    async def close_forwarder(app: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        await forwarder.close()

    app.on_before_shutdown.connect(close_forwarder)

    async def keyed(view: View, request: Request, key: bytes, table: str,
                    answer: Callable[[PartitionStore], Response]) -> Response:  # fmt: skip
        """Answer a view of `key` from the worker that owns its task: here, from committed
        local state; else one hop to the owner the group says; else 503 (streams/ops/
        routing.py). The answer names the partition and the worker that served it."""
        partition = partition_for(key, settings.partitions)
        store = engine.serving(table, partition)
        if store is not None:
            resp = answer(store)
            resp.headers[H_PARTITION], resp.headers[H_SERVED_BY] = str(partition), me
            return resp
        owner = engine.owner(partition)
        if request.headers.get(H_HOP) or owner is None or owner == me:
            why = (f"task {partition} is moving between workers (a rebalance or a restore)"
                   if owner != me else f"task {partition} is not serving here yet "
                   "(being restored or rebuilt)")  # fmt: skip
            status, body, headers = unavailable(partition, why)
            return view.json(body, status=status, headers=headers)
        return cast(Response, await forwarder.forward(request, owner, partition))

    def denied(view: View, request: Request) -> Response | None:
        if not token:
            return None
        given = request.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return None
        return view.json({"error": "unauthorized"}, status=401)

    @app.page("/health/")
    class Health(View):
        async def get(self, request: Request) -> Response:
            return self.json({"status": "ok"})

    @app.page("/ready/")
    class Ready(View):
        async def get(self, request: Request) -> Response:
            if (resp := denied(self, request)) is not None:
                return resp
            body: dict[str, Any] = {
                "ready": engine.ready,
                "assigned": engine.assigned,
                "recovering": engine.recovering,
                "failing": engine.failed,
                "tasks": sorted(engine.tasks),
                "stats": engine.stats,
                "breakers": breakers(),
            }
            return self.json(body, status=200 if engine.ready else 503)

    def breakers() -> dict[str, object]:
        """Each owned saga task's gateway breaker (docs/retries.md#the-circuit-breaker)."""
        out: dict[str, object] = {}
        for partition in sorted(engine.tasks):
            store = engine.store(BREAKER, partition)
            if store is not None:
                out[str(partition)] = describe(store.get, breaker_config)
        return out

    @app.page("/metrics")
    class Metrics(View):
        """Prometheus text exposition (streams/ops/metrics.py); token-guarded like the
        other views (a Prometheus scrape config sends it as `authorization`)."""

        async def get(self, request: Request) -> Response:
            if (resp := denied(self, request)) is not None:
                return resp
            if registry is None:
                return self.json({"error": "no metrics registry"}, status=404)
            # aiohttp refuses a charset in `content_type`; Prometheus' type names one
            return self.bytes(generate(registry), headers={"Content-Type": CONTENT_TYPE})

    @app.page("/payments/{payment_id}/")
    class PaymentView(View):
        async def get(self, request: Request, payment_id: str) -> Response:
            if (resp := denied(self, request)) is not None:
                return resp
            key = payment_id.encode()

            def answer(store: PartitionStore) -> Response:
                value = store.get(key)
                if value is None:
                    return self.json({"error": "not found", "payment_id": payment_id},
                                     status=404)  # fmt: skip
                return self.bytes(value, content_type="application/json")

            return await keyed(self, request, key, PAYMENTS, answer)
