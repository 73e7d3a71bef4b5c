"""Operator web views over the tables (Faust web), routed to the worker owning the key.

Payment data is not public: the server binds to loopback by default, Faust's built-in
`/table` dumps are off, and when `PAYSAGA_WEB_TOKEN` is set every view but `/health`
requires `Authorization: Bearer <token>`. Binding off loopback without a token is refused.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any

import aiohttp
import faust
from faust.web import Request, Response, View

from paysaga.streams.partitioner import partition_for
from paysaga.streams.settings import Settings


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


def owner_url(app: faust.App, table: faust.Table, key: bytes) -> str | None:
    """URL of the worker owning `key` in `table`, or None when it is this worker.

    Faust's own `table_route` asks the producer for the changelog topic's metadata, which
    a transactional producer may never have loaded (it then fails with a TypeError); the
    assignor's changelog distribution plus our partitioner answer without it.
    """
    topic = table.changelog_topic.get_topic_name()
    partition = partition_for(key, table.partitions or app.conf.topic_partitions)
    me = str(app.conf.canonical_url).rstrip("/")
    for url, topics in app.assignor.changelog_distribution.items():
        if partition in topics.get(topic, ()):
            return None if str(url).rstrip("/") == me else str(url).rstrip("/")
    return None


async def forward(view: View, request: Request, base_url: str) -> Response:
    """Proxy a GET to the worker that owns the key (auth header included)."""
    headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(base_url + request.path, headers=headers) as resp,
    ):
        body = await resp.read()
        return view.bytes(body, content_type=resp.content_type, status=resp.status)


def register_views(app: faust.App, settings: Settings, payments: faust.Table) -> None:
    """Register /health, /ready and /payments/{payment_id}/ on `app`."""
    check_web_settings(settings)
    token = settings.web_token

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
            recovered = app.tables.recovery.completed.is_set()
            ready = recovered and not getattr(app, "rebalancing", False)
            body: dict[str, Any] = {"ready": ready, "recovered": recovered}
            return self.json(body, status=200 if ready else 503)

    @app.page("/payments/{payment_id}/")
    class PaymentView(View):
        async def get(self, request: Request, payment_id: str) -> Response:
            if (resp := denied(self, request)) is not None:
                return resp
            key = payment_id.encode()
            if (owner := owner_url(app, payments, key)) is not None:
                return await forward(self, request, owner)
            value = payments.get(key)
            if value is None:
                return self.json({"error": "not found", "payment_id": payment_id}, status=404)
            return self.json(value)
