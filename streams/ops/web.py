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
from typing import Any

import faust
from faust.web import Request, Response, View
from prometheus_client import CollectorRegistry

from paysaga.schemas.codec import AvroCodec
from paysaga.schemas.registry import SchemaRegistry
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import Topics
from paysaga.streams.engine import ExactlyOnceEngine
from paysaga.streams.ops.api import ApiWriter, PaymentsApi, Reply
from paysaga.streams.ops.history import trail
from paysaga.streams.ops.metrics import CONTENT_TYPE, generate
from paysaga.streams.ops.openapi import openapi
from paysaga.streams.ops.recon_view import parse_window_start
from paysaga.streams.ops.routing import RETRY_AFTER_S, Answer, Forwarder, Router
from paysaga.streams.ops.state_views import (
    idempotency_key,
    idempotency_path,
    not_found,
    payment_key,
    payment_path,
    render_idempotency,
    render_payment,
)
from paysaga.streams.ops.topic_views import DlqFold, ReconFold, TopicFollower
from paysaga.tables.breaker import BREAKER, describe
from paysaga.tables.idempotency import IDEMPOTENCY
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


def page(app: faust.App, *paths: str) -> Callable[[type[View]], type[View]]:
    """Register one view under each of `paths` (`/ready` and `/ready/`: both are asked)."""

    def decorate(view: type[View]) -> type[View]:
        app.page(paths[0])(view)
        for n, path in enumerate(paths[1:], 1):
            app.page(path)(type(f"{view.__name__}{n}", (view,), {}))
        return view

    return decorate


def register_views(app: faust.App, settings: Settings, engine: ExactlyOnceEngine,
                   registry: CollectorRegistry | None = None) -> None:  # fmt: skip
    """Register the operator views, /metrics, /openapi.json and the payments API on `app`
    (docs/api.md, docs/operations.md#any-worker-answers)."""
    check_web_settings(settings)
    token = settings.web_token
    breaker_config = settings.breaker_config()
    me = settings.web_endpoint
    forwarder = Forwarder(me, settings.web_forward_timeout_ms)
    router = Router(engine, settings.partitions, me, forwarder, token)
    writer = ApiWriter(settings.bootstrap)
    codec = AvroCodec(SchemaRegistry())
    api = PaymentsApi(settings, router, writer, codec)
    spec = openapi(settings.api_max_wait_ms)
    names = Topics(settings.topic_prefix)
    dlq = DlqFold()
    dlq_follower = TopicFollower(settings.bootstrap, [names.dlq], dlq)
    recon = ReconFold(codec, names.recon_reports)
    recon_topics = [names.recon_reports, names.recon_discrepancies]
    recon_follower = TopicFollower(settings.bootstrap, recon_topics, recon)

    async def close_clients(app: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        await forwarder.close()
        await writer.close()
        await dlq_follower.close()
        await recon_follower.close()

    async def caught_up(view: View, follower: TopicFollower) -> Response | None:
        """None once `follower` has read everything committed; else a 503 saying why."""
        try:
            await follower.catch_up(settings.web_forward_timeout_ms / 1000 * 5)
        except (TimeoutError, LookupError, OSError) as exc:
            return view.json({"error": f"cannot read the topics yet: {exc}",
                              "retry_after_s": RETRY_AFTER_S}, status=503,
                             headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip
        return None

    app.on_before_shutdown.connect(close_clients)

    def denied(view: View, request: Request) -> Response | None:
        if not token:
            return None
        try:
            given = request.headers.get("Authorization", "").encode()
        except UnicodeEncodeError:  # bytes that are no text: not the token either
            given = b""
        if hmac.compare_digest(given, f"Bearer {token}".encode()):
            return None
        return view.json({"error": "unauthorized", "code": "unauthorized"}, status=401)

    def answer(view: View, a: Answer) -> Response:
        return view.bytes(a.body, status=a.status, headers=a.headers)

    def reply(view: View, r: Reply) -> Response:
        return view.bytes(r.body.model_dump_json().encode(), status=r.status,
                          headers={"Content-Type": "application/json", **r.headers})  # fmt: skip

    @page(app, "/health", "/health/")
    class Health(View):
        async def get(self, request: Request) -> Response:
            return self.json({"status": "ok"})

    @page(app, "/ready", "/ready/")
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

    @page(app, "/metrics", "/metrics/")
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

    @page(app, "/openapi.json")
    class OpenApi(View):
        async def get(self, request: Request) -> Response:
            if (resp := denied(self, request)) is not None:
                return resp
            return self.json(spec)

    @page(app, "/payments/{payment_id}", "/payments/{payment_id}/")
    class PaymentView(View):
        async def get(self, request: Request, payment_id: str) -> Response:
            if (resp := denied(self, request)) is not None:
                return resp
            a = await router.read(payment_key(payment_id), PAYMENTS, render_payment(payment_id),
                                  payment_path(payment_id), request)  # fmt: skip
            return answer(self, a)

    @page(app, "/payments/{payment_id}/events")
    class PaymentEvents(View):
        """The payment's audit trail, from the topics (streams/ops/history.py): any worker
        answers it alike."""

        async def get(self, request: Request, payment_id: str) -> Response:
            if (resp := denied(self, request)) is not None:
                return resp
            try:
                found = await trail(settings, payment_id, settings.web_forward_timeout_ms / 100)
            except (TimeoutError, OSError) as exc:
                return self.json({"error": f"cannot read the history yet: {exc}",
                                  "retry_after_s": RETRY_AFTER_S}, status=503,
                                 headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip
            if not found.events:
                return self.bytes(not_found("payment", payment_id)[1], status=404,
                                  content_type="application/json")  # fmt: skip
            return self.bytes(found.model_dump_json().encode(), content_type="application/json")

    @page(app, "/idempotency/{merchant_id}/{key}")
    class IdempotencyView(View):
        async def get(self, request: Request, merchant_id: str, key: str) -> Response:
            if (resp := denied(self, request)) is not None:
                return resp
            a = await router.read(idempotency_key(merchant_id, key), IDEMPOTENCY,
                                  render_idempotency(merchant_id, key),
                                  idempotency_path(merchant_id, key), request)  # fmt: skip
            return answer(self, a)

    @page(app, "/dlq", "/dlq/")
    class DeadLetters(View):
        async def get(self, request: Request) -> Response:
            if (resp := denied(self, request)) is not None:
                return resp
            if (resp := await caught_up(self, dlq_follower)) is not None:
                return resp
            return self.bytes(dlq.view().model_dump_json().encode(),
                              content_type="application/json")  # fmt: skip

    @page(app, "/reconciliation/{merchant_id}/{currency}")
    class ReconWindowsView(View):
        async def get(self, request: Request, merchant_id: str, currency: str) -> Response:
            if (resp := denied(self, request)) is not None:
                return resp
            if (resp := await caught_up(self, recon_follower)) is not None:
                return resp
            body = recon.windows(merchant_id, currency).model_dump_json().encode()
            return self.bytes(body, content_type="application/json")

    @page(app, "/reconciliation/{merchant_id}/{currency}/{window_start}")
    class ReconWindowView(View):
        async def get(self, request: Request, merchant_id: str, currency: str,
                      window_start: str) -> Response:  # fmt: skip
            if (resp := denied(self, request)) is not None:
                return resp
            try:
                start = parse_window_start(window_start)
            except (ValueError, OverflowError):
                return self.json({"error": "window_start is neither epoch millis nor ISO 8601",
                                  "code": "invalid_window_start"}, status=400)  # fmt: skip
            if (resp := await caught_up(self, recon_follower)) is not None:
                return resp
            found = recon.window(merchant_id, currency, start)
            if found is None:
                return self.json({"error": "no report for this window", "code": "not_found"},
                                 status=404)  # fmt: skip
            return self.bytes(found.model_dump_json().encode(), content_type="application/json")

    @page(app, "/v1/payments")
    class Payments(View):
        async def post(self, request: Request) -> Response:
            if (resp := denied(self, request)) is not None:
                return resp
            return reply(self, await api.create(request.headers, await request.read(),
                                                request.query))  # fmt: skip

    @page(app, "/v1/payments/{payment_id}")
    class OnePayment(View):
        async def get(self, request: Request, payment_id: str) -> Response:
            if (resp := denied(self, request)) is not None:
                return resp
            return reply(self, await api.get(payment_id))

    def operation(op: Any) -> type[View]:
        class Operation(View):
            async def post(self, request: Request, payment_id: str) -> Response:
                if (resp := denied(self, request)) is not None:
                    return resp
                return reply(
                    self,
                    await api.request(
                        op, payment_id, request.headers, await request.read(), request.query
                    ),
                )

        Operation.__name__ = f"{op.title()}Payment"
        return Operation

    for op in ("capture", "refund", "cancel"):
        page(app, f"/v1/payments/{{payment_id}}/{op}")(operation(op))
