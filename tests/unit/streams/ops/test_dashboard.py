"""`make run`'s live view from a worker's real exposition (a PrometheusSink's registry,
with the collector's names as a worker serves them): rates between two scrapes, the p95
as Prometheus' histogram_quantile computes it, the plain line under 160 columns and the
terminal table."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from paysaga.agents import metrics as m
from paysaga.streams.ops.dashboard import Scrape, figures, plain_line, quantile, table
from paysaga.streams.ops.metrics import PrometheusSink, generate

SCRAPED = """
# TYPE paysaga_engine_records counter
paysaga_engine_records_total {records}
# TYPE paysaga_ready gauge
paysaga_ready 1
# TYPE paysaga_consumer_lag gauge
paysaga_consumer_lag{{partition="0",topic="t"}} 7
paysaga_consumer_lag{{partition="1",topic="t"}} 5
# TYPE paysaga_breaker_state gauge
paysaga_breaker_state{{partition="0",state="closed"}} 1
paysaga_breaker_state{{partition="0",state="open"}} 0
paysaga_breaker_state{{partition="1",state="closed"}} 0
paysaga_breaker_state{{partition="1",state="open"}} 1
"""


def scrape(sink: PrometheusSink, at: float, records: int) -> Scrape:
    return Scrape.parse(generate(sink.registry).decode() + SCRAPED.format(records=records), at)


def test_figures_between_two_scrapes() -> None:
    sink = PrometheusSink()
    sink.count(m.GATEWAY_ANSWERS.name, ("authorize", "ok"), 90)
    sink.count(m.GATEWAY_ANSWERS.name, ("authorize", "declined"), 10)
    sink.count(m.PAYMENTS_STARTED.name, ("PAYMENT", "CONTROL"), 100)
    before = scrape(sink, 10.0, 1_000)
    sink.count(m.PAYMENTS_STARTED.name, ("PAYMENT", "CONTROL"), 50)
    sink.count(m.GATEWAY_ANSWERS.name, ("capture", "error"), 100)
    sink.count(m.SAGAS_ENDED.name, ("PAYMENT", "COMPLETED", "CONTROL"), 40)
    sink.count(m.RETRIES_SCHEDULED.name, ("1", "CONTROL", "transient"), 3)
    sink.count("paysaga_dead_letters", ("validation",), 2)
    for ms in range(1, 101):  # 1 .. 100 ms: the p95 falls in the 0.1 s bucket
        sink.observe(m.REQUEST_TO_AUTHORIZED.name, (), ms / 1000)
    now = scrape(sink, 12.0, 3_000)
    f = figures(now, before)
    assert f.records_per_s == 1_000 and f.started_per_s == 25 and f.ended_per_s == 20
    assert f.decline_rate == pytest.approx(0.1) and f.gateway_error_rate == pytest.approx(0.5)
    assert f.sagas == {"COMPLETED": 40} and f.retries_by_level == {"1": 3}
    assert f.dead_letters == {"validation": 2} and f.lag == 12 and f.ready
    assert f.breakers == {"0": "closed", "1": "open"}
    assert f.p95_authorized_s == pytest.approx(0.095, abs=0.003)
    line = plain_line(f)
    assert len(line) < 160 and "1000 rec/s" in line and "decl 10.0%" in line and "co" in line
    out = io.StringIO()
    Console(file=out, width=120, color_system=None).print(table(f, "paysaga"))
    text = out.getvalue()
    assert "p1:open" in text and "declines 10.0%" in text and "validation=2" in text


def test_a_quantile_follows_histogram_quantile() -> None:
    sink = PrometheusSink()
    assert quantile(0.95, scrape(sink, 0, 0), None, m.REQUEST_TO_AUTHORIZED.name) is None
    for v in (0.2,) * 10:
        sink.observe(m.REQUEST_TO_AUTHORIZED.name, (), v)  # all in (0.1, 0.25]
    q = quantile(0.5, scrape(sink, 0, 0), None, m.REQUEST_TO_AUTHORIZED.name)
    assert q == pytest.approx(0.175)  # linear within the bucket, as Prometheus does
    sink.observe(m.REQUEST_TO_AUTHORIZED.name, (), 10_000.0)  # beyond the last bucket
    q = quantile(0.99, scrape(sink, 0, 0), None, m.REQUEST_TO_AUTHORIZED.name)
    assert q == 300.0  # the last finite bound
