"""`make run`'s live view: the worker's own `/metrics`, redrawn in place.

One way to see the figures: the dashboard reads the same exposition Prometheus scrapes
(streams/ops/metrics.py) and shows rates over the last interval, the p95 from request to
authorization, outcomes, dead letters, retries, consumer lag, the breakers and
reconciliation. On a terminal it is a `rich` table redrawn in place; into a pipe or a file
it is one plain line (under 160 columns) per interval.
"""

from __future__ import annotations

import math
import sys
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TextIO

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.live import Live
from rich.table import Table

Samples = dict[str, list[tuple[dict[str, str], float]]]


@dataclass(frozen=True)
class Scrape:
    """One read of `/metrics`: every sample by name, and when (monotonic seconds)."""

    at: float
    samples: Samples

    @classmethod
    def parse(cls, text: str, at: float) -> Scrape:
        out: Samples = defaultdict(list)
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[s.name].append((s.labels, s.value))
        return cls(at, dict(out))

    def total(self, name: str, **labels: str) -> float:
        return sum(v for lv, v in self.samples.get(name, []) if labels.items() <= lv.items())

    def by(self, name: str, label: str, **labels: str) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for lv, v in self.samples.get(name, []):
            if labels.items() <= lv.items() and label in lv:
                out[lv[label]] += v
        return dict(out)


def quantile(q: float, now: Scrape, before: Scrape | None, name: str) -> float | None:
    """The q-quantile of histogram `name` over the observations between two scrapes (all
    of them without `before`), interpolated within its bucket as Prometheus'
    `histogram_quantile` does; None with no observation."""
    buckets = now.by(f"{name}_bucket", "le")
    if before is not None:
        earlier = before.by(f"{name}_bucket", "le")
        buckets = {le: n - earlier.get(le, 0.0) for le, n in buckets.items()}
    ordered = sorted(((float(le), n) for le, n in buckets.items()), key=lambda b: b[0])
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # beyond the last finite bucket: its bound, as Prometheus
            width = count - lower_count
            share = (rank - lower_count) / width if width else 1.0
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return None


@dataclass
class Figures:
    """What the dashboard shows, from two scrapes."""

    seconds: float
    records_per_s: float
    started_per_s: float
    ended_per_s: float
    p95_authorized_s: float | None
    decline_rate: float | None
    gateway_error_rate: float | None
    sagas: dict[str, float] = field(default_factory=dict)
    payments_started: float = 0.0
    retries_by_level: dict[str, float] = field(default_factory=dict)
    dead_letters: dict[str, float] = field(default_factory=dict)
    discrepancies: dict[str, float] = field(default_factory=dict)
    breakers: dict[str, str] = field(default_factory=dict)
    held: float = 0.0
    lag: float = 0.0
    ready: bool = False


def _rate(now: Scrape, before: Scrape | None, name: str, **labels: str) -> float:
    if before is None or now.at <= before.at:
        return 0.0
    return max(0.0, now.total(name, **labels) - before.total(name, **labels)) / (now.at - before.at)


def _share(part: float, whole: float) -> float | None:
    return part / whole if whole > 0 else None


def _nonzero(d: dict[str, float]) -> dict[str, float]:
    """Series the worker created at zero (so Prometheus sees their first increase) are
    noise on a screen."""
    return {k: v for k, v in d.items() if v}


def figures(now: Scrape, before: Scrape | None) -> Figures:
    answers = "paysaga_gateway_answers_total"
    auth = {r: now.total(answers, step="authorize", result=r) for r in ("ok", "declined")}
    by_result = now.by(answers, "result")
    breakers = {}
    for lv, v in now.samples.get("paysaga_breaker_state", []):
        if v == 1:
            breakers[lv["partition"]] = lv["state"]
    return Figures(
        seconds=0.0 if before is None else now.at - before.at,
        records_per_s=_rate(now, before, "paysaga_engine_records_total"),
        started_per_s=_rate(now, before, "paysaga_payments_started_total"),
        ended_per_s=_rate(now, before, "paysaga_sagas_ended_total"),
        p95_authorized_s=quantile(0.95, now, before, "paysaga_request_to_authorized_seconds"),
        decline_rate=_share(auth["declined"], auth["ok"] + auth["declined"]),
        gateway_error_rate=_share(by_result.get("error", 0.0), sum(
            by_result.get(r, 0.0) for r in ("ok", "declined", "error"))),
        sagas=_nonzero(now.by("paysaga_sagas_ended_total", "state")),
        payments_started=now.total("paysaga_payments_started_total"),
        retries_by_level=_nonzero(now.by("paysaga_retries_scheduled_total", "level")),
        dead_letters=_nonzero(now.by("paysaga_dead_letters_total", "kind")),
        discrepancies=_nonzero(now.by("paysaga_reconciliation_discrepancies_total", "status")),
        breakers=dict(sorted(breakers.items())),
        held=now.total("paysaga_breaker_held"),
        lag=now.total("paysaga_consumer_lag"),
        ready=now.total("paysaga_ready") >= 1,
    )  # fmt: skip


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _counts(d: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.0f}" for k, v in sorted(d.items()) if v) or "-"


def plain_line(f: Figures) -> str:
    """One line for a pipe or a log file, kept under 160 columns."""
    p95 = "-" if f.p95_authorized_s is None else f"{1000 * f.p95_authorized_s:.0f}ms"
    # the open-ended parts (counts by kind) last: a long line loses only their tail
    parts = [
        f"{f.records_per_s:.0f} rec/s", f"{f.started_per_s:.0f} pay/s", f"lag {f.lag:.0f}",
        f"p95 auth {p95}", f"decl {_pct(f.decline_rate)}", f"gw err {_pct(f.gateway_error_rate)}",
        "breaker " + ("".join(s[0] for s in f.breakers.values()) or "-"),
        f"retry {_counts(f.retries_by_level)}", f"DLQ {_counts(f.dead_letters)}",
        f"sagas {_counts(f.sagas)}",
    ]  # fmt: skip
    return "  ".join(parts)[:159]


def table(f: Figures, title: str) -> Table:
    """The terminal view: one row per figure."""
    t = Table(title=title, title_justify="left", show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold cyan", no_wrap=True)
    t.add_column()
    p95 = "-" if f.p95_authorized_s is None else f"{1000 * f.p95_authorized_s:,.0f} ms"
    ready = "[green]ready[/]" if f.ready else "[red]not ready[/]"
    t.add_row("worker", f"{ready}   input {f.records_per_s:,.0f} records/s   lag {f.lag:,.0f}")
    t.add_row("payments", f"{f.started_per_s:,.1f}/s started ({f.payments_started:,.0f} in all)"
              f"   {f.ended_per_s:,.1f}/s sagas ended")  # fmt: skip
    t.add_row("request to authorized", f"p95 {p95}")
    t.add_row("gateway", f"declines {_pct(f.decline_rate)}   errors {_pct(f.gateway_error_rate)}")
    t.add_row("saga outcomes", _counts(f.sagas))
    t.add_row("retries scheduled", " ".join(f"L{k}={v:,.0f}" for k, v in
                                            sorted(f.retries_by_level.items())) or "-")  # fmt: skip
    states = {"closed": "green", "half_open": "yellow", "open": "red"}
    breakers = "  ".join(f"p{p}:[{states.get(s, 'white')}]{s}[/]" for p, s in f.breakers.items())
    t.add_row("breakers", (breakers or "-") + (f"   {f.held:,.0f} held" if f.held else ""))
    t.add_row("dead letters", _counts(f.dead_letters))
    t.add_row("reconciliation", "discrepancies " + _counts(f.discrepancies))
    return t


def scrape(base_url: str, token: str | None, timeout: float = 2.0) -> Scrape | None:
    req = urllib.request.Request(base_url.rstrip("/") + "/metrics")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Scrape.parse(resp.read().decode(), time.monotonic())
    except (OSError, ValueError):
        return None


def run_dashboard(base_url: str, token: str | None, interval: float = 2.0,
                  out: TextIO | None = None, rounds: int | None = None) -> None:  # fmt: skip
    """Show the worker at `base_url` every `interval` seconds until interrupted (or for
    `rounds` intervals)."""
    stream = out or sys.stdout
    console = Console(file=stream)
    before: Scrape | None = None
    title = f"paysaga  {base_url}  (Ctrl-C stops everything)"
    n = 0

    def step() -> Figures | None:
        nonlocal before
        now = scrape(base_url, token)
        if now is None:
            return None
        f = figures(now, before)
        before = now
        return f

    if console.is_terminal:
        with Live(console=console, auto_refresh=False, transient=False) as live:
            while rounds is None or n < rounds:
                f = step()
                if f is not None:
                    live.update(table(f, title), refresh=True)
                n += 1
                time.sleep(interval)
        return
    while rounds is None or n < rounds:
        f = step()
        print(plain_line(f) if f is not None else "(the worker's /metrics did not answer)",
              file=stream, flush=True)  # fmt: skip
        n += 1
        time.sleep(interval)
