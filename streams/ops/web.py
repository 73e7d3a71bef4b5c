"""Operator web views over the tables (Faust web), answering for the partitions this worker owns.

Payment data is not public: the server binds to loopback by default, Faust's built-in
`/table` dumps are off, and when `PAYSAGA_WEB_TOKEN` is set every view but `/health`
requires `Authorization: Bearer <token>` (`/ready/` too: its failure texts and counters are
for operators); `/health` answers nothing but `{"status": "ok"}`. Binding off loopback
without a token is refused.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any

import faust
from faust.web import Request, Response, View
from prometheus_client import CollectorRegistry

from paysaga.streams.app.settings import Settings
from paysaga.streams.engine import ExactlyOnceEngine
from paysaga.streams.engine.partitioner import partition_for
from paysaga.streams.ops.metrics import CONTENT_TYPE, generate
from paysaga.tables.breaker import BREAKER, describe
from paysaga.tables.payments import PAYMENTS


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
            partition = partition_for(key, settings.partitions)
            store = engine.store(PAYMENTS, partition)
            if store is None:
                # Another worker owns this partition (cross-worker routing: not yet).
                body = {"error": "not owned by this worker", "partition": partition}
                return self.json(body, status=421)
            value = store.get(key)
            if value is None:
                return self.json({"error": "not found", "payment_id": payment_id}, status=404)
            return self.bytes(value, content_type="application/json")
