"""Reconciliation end to end through the broker: one worker, the test plays gateway and bank.

Windows of 4 s with 2 s of grace; the worker's idle policy (1 s) moves stream time on
once the inputs stop, so windows close by stream time while the test only waits."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from paysaga.streams.app.topics import create_topics
from tests.recon_support import ReconWorld
from tests.support import WorkerProcess, isolated_settings, wait_for

WINDOW_MS, GRACE_MS = 4_000, 2_000


@pytest.fixture(scope="module")
def world(broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReconWorld]:
    tmp: Path = tmp_path_factory.mktemp("recon")
    settings = isolated_settings(broker.bootstrap, tmp / "state", "recon",
                                 recon_window_ms=WINDOW_MS, recon_grace_ms=GRACE_MS,
                                 idle_ms=1_000)  # fmt: skip
    asyncio.run(create_topics(settings))
    worker = WorkerProcess(settings, tmp / "worker.log").start()
    yield ReconWorld(settings)
    worker.kill()


def merchant() -> str:
    return "m-" + uuid.uuid4().hex[:10]


def test_a_clean_feed_has_no_discrepancies_and_matches_the_captured_total(
    world: ReconWorld,
) -> None:
    m, w = merchant(), world.next_window()
    amounts = [1000 + 7 * i for i in range(20)]
    for i, a in enumerate(amounts):
        world.capture(m, f"{m}-{i}", a, at=w + 10 * i)
    for i, a in enumerate(amounts):
        world.line(m, str(i), f"gw-{m}-{i}", a, at=w + 1_000 + 10 * i)
    world.flush()
    (report,) = wait_for(lambda: world.reports(m), timeout=60, what="the window's report")
    assert report["window_start"] == w and report["revision"] == 1
    assert (report["matched_count"], report["matched_minor"]) == (20, sum(amounts))
    assert report["internal_minor"] == report["bank_minor"] == sum(amounts)
    assert report["category_counts"] == {}
    assert world.discrepancies(m) == []


def test_injected_discrepancies_are_each_reported_once_in_their_category(
    world: ReconWorld,
) -> None:
    m, w = merchant(), world.next_window()
    for i in range(6):
        world.capture(m, f"{m}-{i}", 1000 * (i + 1), at=w + 10 * i)
    world.capture(m, f"{m}-0", 1000, at=w + 100)  # the gateway re-answered: one movement
    world.line(m, "0", f"gw-{m}-0", 1000, at=w + 1_000)
    # capture 1: no line -> MISSING_IN_BANK
    world.line(m, "2", f"gw-{m}-2", 2999, at=w + 1_010)  # AMOUNT_MISMATCH
    world.line(m, "3", f"gw-{m}-3", 4000, at=w + 1_020, currency="USD")  # CURRENCY_MISMATCH
    world.line(m, "4", f"pay-{m}-4", 5000, at=w + 1_030)
    world.line(m, "4b", f"pay-{m}-4", 5000, at=w + 1_040)  # DUPLICATE_IN_BANK
    world.line(m, "5", None, 6000, at=w + 1_050)  # no reference: tier 2 matches it
    world.line(m, "x", "unknown", 777, at=w + 1_060)  # MISSING_INTERNAL
    world.flush()
    (report,) = wait_for(lambda: world.reports(m), timeout=60, what="the window's report")
    found = sorted((d["kind"], d["payment_id"], d["line_key"]) for d in world.discrepancies(m))
    assert found == sorted([
        ("MISSING_IN_BANK", f"pay-{m}-1", None),
        ("AMOUNT_MISMATCH", f"pay-{m}-2", f"st-{m}/2"),
        ("CURRENCY_MISMATCH", f"pay-{m}-3", f"st-{m}/3"),
        ("DUPLICATE_IN_BANK", f"pay-{m}-4", f"st-{m}/4b"),
        ("MISSING_INTERNAL", None, f"st-{m}/x"),
    ])  # fmt: skip
    assert report["internal_count"] == 6 and report["matched_count"] == 3
    assert report["category_counts"] == {"AMOUNT_MISMATCH": 1, "CURRENCY_MISMATCH": 1,
                                         "DUPLICATE_IN_BANK": 1, "MISSING_INTERNAL": 1,
                                         "MISSING_IN_BANK": 1}  # fmt: skip


def test_a_late_line_revises_the_report_and_resolves_the_missing(world: ReconWorld) -> None:
    m, w = merchant(), world.next_window()
    world.capture(m, f"{m}-1", 4200, at=w + 5)
    world.flush()
    (_first,) = wait_for(lambda: world.reports(m), timeout=60, what="the first report")
    (missing,) = world.discrepancies(m)
    assert missing["kind"] == "MISSING_IN_BANK" and missing["status"] == "OPEN"
    world.line(m, "1", f"gw-{m}-1", 4200, at=w + WINDOW_MS + GRACE_MS + 1_000)  # after close
    world.flush()
    reports = wait_for(lambda: (r := world.reports(m)) and len(r) == 2 and r, timeout=60,
                       what="the revised report")  # fmt: skip
    assert [r["revision"] for r in reports] == [1, 2]
    assert reports[1]["matched_count"] == 1 and reports[1]["resolved_count"] == 1
    resolved = world.discrepancies(m)[-1]
    assert resolved["discrepancy_id"] == missing["discrepancy_id"]
    assert resolved["status"] == "RESOLVED"
