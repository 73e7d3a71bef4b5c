"""The figures paysaga's agents count, by name: what an operator watches and alerts on.

Agents report them through `ProcessorContext.count` / `observe`, so each describes
committed work only (streams/engine/metrics.py). The Prometheus side (`/metrics`, the
alert rules in docker/prometheus/) is `paysaga.streams.ops.metrics`, which declares every
`Metric` here; the names are Prometheus names (a counter gets `_total` there). Rates are
the alert rules' business: every figure here is a count, or a histogram in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from paysaga.domain.reconciliation import DISCREPANCIES
from paysaga.streams.engine.deadletter import PERMANENT_KINDS
from paysaga.streams.engine.metrics import COMMIT_SECONDS, DEAD_LETTERS

#: The label value `variant` takes: the configured retry strategies (the sink is told them).
VARIANTS = "<variants>"


@dataclass(frozen=True)
class Metric:
    """One figure: a counter, or a histogram (with `buckets`, in seconds).

    `known`: the values each label can take, where they are known in advance. The sink
    creates every such series at zero, so the first event of a kind is an increase that
    `increase()` and `rate()` see (a series that first appears at 1 shows no increase, and
    an alert on "any discrepancy" would miss the first one a worker finds)."""

    name: str
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    known: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def histogram(self) -> bool:
        return bool(self.buckets)


PAYMENTS_STARTED = Metric(
    "paysaga_payments_started", "Payments whose saga started, by saga and retry variant.",
    ("saga", "variant"), known={"saga": ("PAYMENT", "ORDER"), "variant": (VARIANTS,)},
)  # fmt: skip
INTAKE_DECISIONS = Metric(
    "paysaga_intake_decisions",
    "Payment requests by idempotency decision: new, replay (same key and body), conflict.",
    ("decision",),
    known={"decision": ("new", "replay", "conflict")},
)
COMMANDS_SENT = Metric(
    "paysaga_commands_sent", "Commands sent to a service (INQUIRE: asked about an unanswered key).",
    ("service", "action"),
)  # fmt: skip
GATEWAY_ANSWERS = Metric(
    "paysaga_gateway_answers",
    "Gateway answers applied, by step and result: ok, declined (a permanent failure), "
    "error (the gateway could not act: retried), never_seen (an inquiry's answer).",
    ("step", "result"),
    known={"step": ("authorize", "capture", "void", "refund", "settle", "inquire"),
           "result": ("ok", "declined", "error", "never_seen")},
)  # fmt: skip
SAGAS_ENDED = Metric(
    "paysaga_sagas_ended",
    "Sagas that ended, by saga, state (COMPLETED, COMPENSATED, FAILED, IN_DOUBT) and variant.",
    ("saga", "state", "variant"),
    known={"saga": ("PAYMENT", "ORDER"),
           "state": ("COMPLETED", "COMPENSATED", "FAILED", "IN_DOUBT"), "variant": (VARIANTS,)},
)  # fmt: skip
SAGAS_REOPENED = Metric(
    "paysaga_sagas_reopened", "IN_DOUBT sagas taken up again (a late answer or a resume).",
    ("variant",), known={"variant": (VARIANTS,)},
)  # fmt: skip
SAGA_RETRIES = Metric(
    "paysaga_saga_retries",
    "Commands sent again (attempt 2 and later), by variant: over sagas ended, the average "
    "retry count.",
    ("variant",), known={"variant": (VARIANTS,)},
)  # fmt: skip
RETRIES_SCHEDULED = Metric(
    "paysaga_retries_scheduled", "Retries scheduled, by level, variant and error class.",
    ("level", "variant", "error_class"),
)  # fmt: skip
BREAKER_TRANSITIONS = Metric(
    "paysaga_breaker_transitions", "Gateway circuit breaker transitions, by the state entered.",
    ("to_state",),
)  # fmt: skip
REQUEST_TO_AUTHORIZED = Metric(
    "paysaga_request_to_authorized_seconds",
    "Event time from a payment's request to its authorization.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)
SETTLEMENT_LAG = Metric(
    "paysaga_settlement_lag_seconds", "Event time from a payment's capture to its settlement.",
    buckets=(60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0, 172800.0),
)  # fmt: skip
RECON_DISCREPANCIES = Metric(
    "paysaga_reconciliation_discrepancies",
    "Reconciliation discrepancy records written, by kind and status (OPEN, RESOLVED).",
    ("kind", "status"),
    known={"kind": tuple(c.value for c in DISCREPANCIES), "status": ("OPEN", "RESOLVED")},
)  # fmt: skip
#: The engine's own, declared here beside the agents' so `/metrics` knows them all.
ENGINE_DEAD_LETTERS = Metric(DEAD_LETTERS, "Dead letters written, by kind.", ("kind",),
                             known={"kind": (*sorted(PERMANENT_KINDS), "saga")})  # fmt: skip
ENGINE_COMMIT_SECONDS = Metric(
    COMMIT_SECONDS, "Seconds from a batch's offsets send to its transaction committed.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)  # fmt: skip

METRICS = (
    PAYMENTS_STARTED, INTAKE_DECISIONS, COMMANDS_SENT, GATEWAY_ANSWERS, SAGAS_ENDED,
    SAGAS_REOPENED, SAGA_RETRIES, RETRIES_SCHEDULED, BREAKER_TRANSITIONS,
    REQUEST_TO_AUTHORIZED, SETTLEMENT_LAG, RECON_DISCREPANCIES, ENGINE_DEAD_LETTERS,
    ENGINE_COMMIT_SECONDS,
)  # fmt: skip

#: The saga step a success answers (a failure says its step itself).
_STEP_OF = {"AUTHORIZED": "authorize", "CAPTURED": "capture", "SETTLED": "settle",
            "VOIDED": "void", "REFUNDED": "refund"}  # fmt: skip


def answer_labels(kind: str, step: str | None, result: str) -> tuple[str, str]:
    """(step, result) of a gateway answer for GATEWAY_ANSWERS."""
    return (step or _STEP_OF.get(kind, "unknown")), result
