"""What `/metrics` says and when: figures counted only once their transaction commits,
the saga's figures on the test driver (real RocksDB, no broker), the exposition linted by
`promtool check metrics`, and the alert rules, their unit tests and the Grafana dashboard
checked by promtool too. Through a broker: tests/e2e/streams/ops/test_e2e_metrics.py."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from paysaga.agents import metrics as m
from paysaga.domain.saga import command_id
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topology import paysaga_topology
from paysaga.streams.engine import ProcessorContext, Topology
from paysaga.streams.engine.driver import TopologyTestDriver
from paysaga.streams.engine.metrics import DEAD_LETTERS
from paysaga.streams.ops.metrics import ENGINE_COUNTERS, LoopWatch, PrometheusSink, generate
from tests.saga_support import DriverWorld
from tests.samples import initiated

ROOT = Path(__file__).resolve().parents[4]
PROM = ROOT / "docker" / "prometheus"
DASHBOARD = ROOT / "docker" / "grafana" / "paysaga-dashboard.json"
T0 = 1_790_000_000_000


def promtool(*args: str, cwd: Path = PROM, stdin: str | None = None) -> str:
    """Run promtool; a machine without it fails the test (`make system-deps` installs it)."""
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: run `make system-deps` (Debian's prometheus package)"
    done = subprocess.run([exe, *args], cwd=cwd, input=stdin, capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


# ---- the engine: committed work only -----------------------------------------------------
def test_a_figure_counts_once_however_often_its_batch_was_attempted(tmp_path: Path) -> None:
    topology = Topology()

    @topology.agent("counter", sources=["in"])
    def count(ctx: ProcessorContext, record: object) -> None:
        ctx.count("seen", "in")
        ctx.observe("size", 3.0)

    driver = TopologyTestDriver(topology, tmp_path / "d")
    try:
        driver.pipe("in", b"x", key=b"k", aborts=2)  # two attempts thrown away first
        driver.pipe("in", b"y", key=b"k")
        assert driver.metrics.counts[("seen", ("in",))] == 2
        assert driver.metrics.observations[("size", ())] == [3.0, 3.0]
    finally:
        driver.close()


def test_dead_letters_are_counted_by_kind(tmp_path: Path) -> None:
    topology = Topology()

    @topology.agent("picky", sources=["in"])
    def picky(ctx: ProcessorContext, record: object) -> None:
        ctx.dead_letter("validation", "no")

    driver = TopologyTestDriver(topology, tmp_path / "d")
    try:
        driver.pipe("in", b"x", key=b"k")
        driver.pipe("in", b"y", key=b"k", aborts=1)
        assert driver.metrics.counts[(DEAD_LETTERS, ("validation",))] == 2
    finally:
        driver.close()


# ---- the saga's figures --------------------------------------------------------------------
@pytest.fixture
def world(tmp_path: Path) -> Iterator[DriverWorld]:
    settings = Settings(partitions=1, command_timeout_ms=10_000, data_dir=tmp_path)
    driver = TopologyTestDriver(paysaga_topology(settings), tmp_path / "state", partitions=1,
                                dlq_topic="payment.dlq", wall_ms=T0)  # fmt: skip
    yield DriverWorld(settings, driver)
    driver.close()


def test_a_payment_through_its_saga_is_counted_once_per_step(world: DriverWorld) -> None:
    p = world.initiate(initiated(1, seed=901, saga="PAYMENT", items=[], capture_mode="AUTOMATIC",
                                 occurred_at=T0)[0])  # fmt: skip
    pid = p["payment_id"]
    auth = world.wait_command(pid, "AUTHORIZE")
    world.answer(auth, "AUTHORIZED")
    world.answer(auth, "AUTHORIZED")  # a duplicate: applied once, counted once
    capture = world.wait_command(pid, "CAPTURE")
    world.answer(capture, "CAPTURED")
    settle = {**capture, "command_type": "SETTLE", "occurred_at": capture["occurred_at"] + 60_000,
              "command_id": command_id(f"{pid}:settle:post", 1)}  # fmt: skip
    world.answer(settle, "SETTLED")
    again = world.initiate(initiated(1, seed=902, saga="PAYMENT", items=[],
                                     capture_mode="AUTOMATIC", occurred_at=T0)[0])  # fmt: skip
    world.answer(world.wait_command(again["payment_id"], "AUTHORIZE"), "FAILED",
                 code="card_declined", reason="declined")  # fmt: skip
    c, obs = world.driver.metrics.counts, world.driver.metrics.observations
    variant = next(s["retry_variant"] for s in world.statuses(pid))
    assert c[(m.INTAKE_DECISIONS.name, ("new",))] == 2
    assert c[(m.PAYMENTS_STARTED.name, ("PAYMENT", variant))] >= 1
    assert c[(m.GATEWAY_ANSWERS.name, ("authorize", "ok"))] == 1
    assert c[(m.GATEWAY_ANSWERS.name, ("authorize", "declined"))] == 1
    assert c[(m.GATEWAY_ANSWERS.name, ("capture", "ok"))] == 1
    assert c[(m.GATEWAY_ANSWERS.name, ("settle", "ok"))] == 1
    assert c[(m.COMMANDS_SENT.name, ("payment", "AUTHORIZE"))] == 2
    assert c[(m.SAGAS_ENDED.name, ("PAYMENT", "COMPLETED", variant))] == 1
    assert sum(n for (name, _), n in c.items() if name == m.SAGAS_ENDED.name) == 2
    assert obs[(m.REQUEST_TO_AUTHORIZED.name, ())] == [(auth["occurred_at"] + 10 - T0) / 1000]
    assert obs[(m.SETTLEMENT_LAG.name, ())] == [60.0]


def test_every_figure_the_code_reports_is_declared() -> None:
    """Each `ctx.count`/`observe` in the agents names a declared Metric (an undeclared one
    would only be logged, never shown)."""
    declared = {metric.name for metric in m.METRICS}
    used = set()
    for path in (ROOT / "agents").glob("*.py"):
        text = path.read_text()
        used |= set(re.findall(r"ctx\.(?:count|observe)\(m\.([A-Z_]+)\.name", text))
        used |= set(re.findall(r"ctx\.(?:count|observe)\(([A-Z_]+)\.name", text))
    assert used and {getattr(m, name).name for name in used} <= declared


# ---- the exposition --------------------------------------------------------------------------
def test_the_exposition_passes_promtools_lint() -> None:
    sink = PrometheusSink()
    sink.count(m.GATEWAY_ANSWERS.name, ("authorize", "ok"), 3)
    sink.observe(m.REQUEST_TO_AUTHORIZED.name, (), 0.2)
    sink.count("paysaga_not_declared", (), 1)  # logged once, never raised into a commit
    text = generate(sink.registry).decode()
    assert 'paysaga_gateway_answers_total{result="ok",step="authorize"} 3.0' in text
    assert 'paysaga_request_to_authorized_seconds_bucket{le="0.25"} 1.0' in text
    assert "paysaga_not_declared" not in text
    promtool("check", "metrics", stdin=text)


# ---- alert rules, their tests, the scrape config, the dashboard --------------------------
def test_the_alert_rules_are_valid_and_their_unit_tests_pass() -> None:
    assert "SUCCESS" in promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in promtool("test", "rules", "alerts.test.yml")
    promtool("check", "config", "--syntax-only", "prometheus.yml")
    names = set(re.findall(r"- alert: (\w+)", (PROM / "alerts.yml").read_text()))
    assert {"HighDeclineRate", "ReconciliationMismatch", "PaymentGatewayDown",
            "PaymentSuccessRateLow", "DeadLettersHigh", "SettlementLagHigh"} <= names  # fmt: skip
    # Every rule is exercised by the unit tests, firing (an expected alert) at least once.
    tests = yaml.safe_load((PROM / "alerts.test.yml").read_text())["tests"]
    fired = {case["alertname"] for t in tests for case in t["alert_rule_test"]
             if case.get("exp_alerts")}  # fmt: skip
    assert names <= fired, f"rules no unit test fires: {sorted(names - fired)}"


def _known_names() -> set[str]:
    names = {metric.name for metric in m.METRICS}
    names |= {f"paysaga_engine_{n}" for n in ENGINE_COUNTERS} | {"paysaga_engine_restore_seconds"}
    return names | {"paysaga_ready", "paysaga_tasks", "paysaga_consumer_lag",
                    "paysaga_breaker_state", "paysaga_breaker_held", LoopWatch.NAME,
                    LoopWatch.LATE}  # fmt: skip


def test_the_loop_watch_sees_a_blocked_loop_and_tells_busy_from_waiting() -> None:
    """A loop blocked for 40 ms shows as a tick more than 25 ms late; 40 ms of code
    running counts as busy, 40 ms in a blocking call as waiting."""
    registry = CollectorRegistry()
    watch = LoopWatch(registry, interval_s=0.01)

    async def tick_after(block: Callable[[], None]) -> None:
        seen = _count(registry, "+Inf")
        block()
        while _count(registry, "+Inf") == seen:  # the late tick observed
            await asyncio.sleep(0.005)

    def spin() -> None:  # code running on the loop's thread
        end = time.perf_counter() + 0.04
        while time.perf_counter() < end:
            pass

    async def main() -> None:
        task = asyncio.create_task(watch.run())
        try:
            while _count(registry, "+Inf") < 3:  # free ticks first
                await asyncio.sleep(0.005)
            await tick_after(lambda: time.sleep(0.04))  # a blocking call, not a wait
            await tick_after(spin)
        finally:
            task.cancel()

    asyncio.run(main())
    assert _count(registry, "+Inf") - _count(registry, "0.025") >= 2
    busy = registry.get_sample_value(f"{LoopWatch.LATE}_total", {"cause": "busy"}) or 0.0
    waiting = registry.get_sample_value(f"{LoopWatch.LATE}_total", {"cause": "waiting"}) or 0.0
    assert busy >= 0.02 and waiting >= 0.02, (busy, waiting)


def _count(registry: CollectorRegistry, le: str) -> float:
    value = registry.get_sample_value(f"{LoopWatch.NAME}_bucket", {"le": le})
    return value or 0.0


def _base(name: str) -> str:
    for suffix in ("_total", "_bucket", "_sum", "_count"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_the_dashboard_and_the_rules_use_only_metrics_that_exist(tmp_path: Path) -> None:
    """Every expression of the dashboard parses (promtool, as recording rules) and, like
    every alert rule, names only metrics a worker serves."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dash["panels"] for t in panel["targets"]]
    rules = [line.split("#")[0] for line in (PROM / "alerts.yml").read_text().splitlines()]
    known = _known_names()
    for expr in [*exprs, *rules]:
        for name in re.findall(r"\bpaysaga_[a-z_]+", expr):
            assert _base(name) in known or name in known, (name, expr)
    recording = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"paysaga:dashboard:{i}", "expr": e} for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    (tmp_path / "dashboard-rules.yml").write_text(json.dumps(recording))  # JSON is YAML
    assert "SUCCESS" in promtool("check", "rules", "dashboard-rules.yml", cwd=tmp_path)


def test_known_series_start_at_zero_and_a_bad_figure_never_raises() -> None:
    """The first discrepancy a worker finds must be an increase Prometheus sees."""
    sink = PrometheusSink(("CONTROL", "TEST_A"))
    text = generate(sink.registry).decode()
    assert ('paysaga_reconciliation_discrepancies_total{kind="MISSING_IN_BANK",status="OPEN"}'
            " 0.0") in text  # fmt: skip
    assert 'paysaga_dead_letters_total{kind="saga"} 0.0' in text
    assert 'paysaga_sagas_ended_total{saga="ORDER",state="IN_DOUBT",variant="TEST_A"} 0.0' in text
    sink.count(m.GATEWAY_ANSWERS.name, ("authorize",), 1)  # one label short: logged, not raised
    sink.observe(m.SETTLEMENT_LAG.name, ("extra",), 1.0)
    assert 'paysaga_gateway_answers_total{result="ok",step="authorize"} 0.0' in generate(
        sink.registry).decode()  # fmt: skip


def test_a_retry_is_counted_when_it_is_sent(world: DriverWorld) -> None:
    p = world.initiate(initiated(1, seed=903, saga="PAYMENT", items=[], capture_mode="AUTOMATIC",
                                 occurred_at=T0)[0])  # fmt: skip
    pid = p["payment_id"]
    world.answer(world.wait_command(pid, "AUTHORIZE"), "FAILED", code="gateway_unavailable",
                 reason="503", retryable=True)  # fmt: skip
    c = world.driver.metrics.counts
    assert sum(n for (name, _), n in c.items() if name == m.SAGA_RETRIES.name) == 0
    world.driver.advance_wall_clock(5_000)  # the level-1 retry falls due and is sent
    assert world.wait_command(pid, "AUTHORIZE", n=2)["attempt"] == 2
    assert sum(n for (name, _), n in c.items() if name == m.SAGA_RETRIES.name) == 1
