"""Reconciliation end to end through the broker: one worker, the test plays gateway and bank.

Windows of 4 s with 6 s of grace (room for a loaded machine); the worker's idle policy (1 s)
moves stream time on once the inputs stop, so windows close by stream time while the test
only waits."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from paysaga.streams.app.kafka_io import read_all
from paysaga.streams.app.topics import create_topics
from paysaga.streams.dev.bank import BankConfig, line_fate, run_bank, statement_lines
from paysaga.streams.engine.deadletter import H_KIND, H_REASON, parse_headers
from paysaga.streams.ops import cli
from tests.recon_support import ReconWorld
from tests.support import WorkerProcess, isolated_settings, wait_for

WINDOW_MS, GRACE_MS = 4_000, 6_000
#: Closed windows are kept this long for adjustments (the late lines here come within it).
RETENTION_MS = 15_000


@pytest.fixture(scope="module")
def world(broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReconWorld]:
    tmp: Path = tmp_path_factory.mktemp("recon")
    settings = isolated_settings(broker.bootstrap, tmp / "state", "recon",
                                 recon_window_ms=WINDOW_MS, recon_grace_ms=GRACE_MS,
                                 recon_retention_ms=RETENTION_MS, idle_ms=1_000)  # fmt: skip
    asyncio.run(create_topics(settings))
    worker = WorkerProcess(settings, tmp / "worker.log").start()
    yield ReconWorld(settings, worker)
    worker.kill()


def _faithful(config: BankConfig, merchant_id: str) -> str:
    """A capture suffix whose capture the feed writes one faithful line for."""
    for i in range(1000):
        cap = {"capture_id": f"cap-warm-{i}", "merchant_id": merchant_id, "occurred_at": 0,
               "gateway_reference": "g", "amount_minor": 1, "currency": "EUR"}  # fmt: skip
        if statement_lines(config, cap)[1] == ["ok"]:
            return f"warm-{i}"
    raise AssertionError("no faithful capture id in 1,000")


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


def test_a_late_line_revises_the_report_and_resolves_the_missing(
    world: ReconWorld, capsys: pytest.CaptureFixture[str]
) -> None:
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
    # What an operator sees, from the committed topics: the window at revision 2, its
    # problem resolved, and no longer among the windows with open problems.
    opts = ["--bootstrap", world.settings.bootstrap, "--topic-prefix", world.settings.topic_prefix]
    start = reports[1]["window_start"]
    capsys.readouterr()
    assert cli.main(["recon", "show", m, "EUR", str(start), *opts]) == 0
    shown = capsys.readouterr().out
    assert "revision 2 (revisions seen: 1, 2)" in shown and "(0 open)" in shown
    assert "RESOLVED" in shown and "MISSING_IN_BANK" in shown and "OPEN" not in shown
    assert cli.main(["recon", "list", "--merchant", m, *opts]) == 0
    listed = capsys.readouterr().out
    assert "1 reconciliation windows" in listed and m in listed
    assert cli.main(["recon", "list", "--merchant", m, "--open", *opts]) == 0
    assert "0 reconciliation windows with open problems" in capsys.readouterr().out
    iso = datetime.fromtimestamp(start / 1000, UTC).isoformat()
    assert cli.main(["recon", "show", m, "EUR", iso, *opts]) == 0
    assert capsys.readouterr().out == shown
    assert cli.main(["recon", "show", m, "EUR", str(start + 1), *opts]) == 1
    # The same from the worker's web views (any worker answers them alike).
    assert world.worker is not None
    code, listing = world.worker.get(f"/reconciliation/{m}/EUR")
    assert code == 200 and [w["revision"] for w in listing["windows"]] == [2]
    assert listing["windows"][0]["open_discrepancies"] == 0
    code, window = world.worker.get(f"/reconciliation/{m}/EUR/{start}")
    assert code == 200 and window["revisions"] == [1, 2] and window["matched_minor"] == 4200
    assert [(d["kind"], d["status"]) for d in window["discrepancies"]] == [
        ("MISSING_IN_BANK", "RESOLVED")]  # fmt: skip
    assert world.worker.get(f"/reconciliation/{m}/EUR/{iso.replace('+00:00', 'Z')}")[1] == window
    assert world.worker.get(f"/reconciliation/{m}/EUR/{start + 1}")[0] == 404
    assert world.worker.get(f"/reconciliation/{m}/EUR/yesterday")[0] == 400


def test_the_bank_feed_simulator_s_injections_are_found_in_their_categories(
    world: ReconWorld,
) -> None:
    config = BankConfig(lag_ms=300, missing_rate=0.05, misstated_rate=0.05, currency_rate=0.03,
                        duplicate_rate=0.03, late_rate=0.03, unreferenced_rate=0.05,
                        extra_rate=0.03, late_ms=WINDOW_MS + GRACE_MS + 2_000,
                        seed=7)  # fmt: skip
    stop = threading.Event()
    stats: Counter[str] = Counter()

    def feed() -> None:
        async def go() -> None:
            halt = asyncio.Event()
            task = asyncio.create_task(run_bank(world.settings, config, halt, stats_out=None))
            while not stop.is_set():
                await asyncio.sleep(0.1)
            halt.set()
            stats.update(await task)

        asyncio.run(go())

    bank = threading.Thread(target=feed, daemon=True)
    bank.start()
    # The feed is live once it wrote the line of a warm-up capture (one fated "ok").
    warm = merchant()
    wid = _faithful(config, warm)
    world.capture(warm, wid, 1, at=int(time.time() * 1000))
    world.flush()
    wait_for(lambda: any(r.key == warm.encode() for r in
                         asyncio.run(read_all(world.settings.bootstrap, world.t.bank_statements))),
             timeout=60, what="the bank feed's first line")  # fmt: skip
    # Event time now (not ahead: an idle partition's stream time follows the wall clock from
    # where it stood), all 300 captures in one window that closes 6 s or more from now.
    now = int(time.time() * 1000)
    w = now - now % WINDOW_MS
    t0 = now if now - w < WINDOW_MS - 1_000 else w + WINDOW_MS  # lines come 300 ms later
    m = merchant()
    caps = [world.capture(m, f"{m}-{i}", 10_000 + i, at=t0 + i) for i in range(300)]
    world.flush()
    fates = {c["capture_id"]: line_fate(config, c["capture_id"]) for c in caps}
    extra = sum(
        1 for c in caps if statement_lines(config, c)[1][-1] == "extra"
    )  # independent of the fate
    expected = Counter({"MISSING_IN_BANK": 0, "AMOUNT_MISMATCH": 0, "CURRENCY_MISMATCH": 0,
                        "DUPLICATE_IN_BANK": 0, "MISSING_INTERNAL": extra})  # fmt: skip
    for fate in fates.values():
        kind = {
            "missing": "MISSING_IN_BANK",
            "misstated": "AMOUNT_MISMATCH",
            "currency": "CURRENCY_MISMATCH",
            "duplicate": "DUPLICATE_IN_BANK",
        }.get(fate)
        if kind:
            expected[kind] += 1
    late = sum(f == "late" for f in fates.values())
    assert late and all(expected.values()), f"the seed injects too little: {expected}, {late}"

    def open_now() -> Counter[str]:
        live: dict[str, str] = {}
        for d in world.discrepancies(m):
            if d["status"] == "OPEN":
                live[d["discrepancy_id"]] = d["kind"]
            else:
                live.pop(d["discrepancy_id"], None)
        return Counter(live.values())

    try:
        wait_for(lambda: open_now() == +expected and len(world.reports(m)) > late / 2,
                 timeout=120, what=f"the injected discrepancies open: {expected}")  # fmt: skip
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}; open: {open_now()}; reports: {world.reports(m)}; feed: {stats}"
        ) from None
    finally:
        stop.set()
        bank.join(30)
    reports = world.reports(m)
    first = [r for r in reports if r["revision"] == 1 and r["window_start"] == t0 - t0 % WINDOW_MS]
    assert len(first) == 1 and first[0]["internal_count"] == 300
    last = max(reports, key=lambda r: r["revision"])
    matched = sum(f in ("ok", "unreferenced", "late", "duplicate") for f in fates.values())
    assert last["matched_count"] == matched  # late ones too, by their revisions
    resolved = [d for d in world.discrepancies(m) if d["status"] == "RESOLVED"]
    assert len(resolved) == late  # each late line resolved its MISSING_IN_BANK
    assert stats["captures"] >= 301  # and the captures of the module's other tests


def test_a_window_past_its_retention_is_forgotten_and_a_later_capture_for_it_refused(
    world: ReconWorld,
) -> None:
    """Stream time passes the window's close plus the retention while the wall clock moves
    on (the idle policy): a capture for it then is a dead letter with the reason, and the
    window is never reported again."""
    m, w = merchant(), world.next_window()
    world.capture(m, f"{m}-1", 1500, at=w + 5)
    world.flush()
    wait_for(lambda: world.reports(m), timeout=60, what="the window's report")
    forgotten = w + WINDOW_MS + GRACE_MS + RETENTION_MS
    # The other merchants' traffic and the idle ticks move stream time past it.
    wait_for(lambda: time.time() * 1000 > forgotten + 3_000, timeout=90, what="the retention")

    def refused() -> list[dict[str, str]]:
        records = asyncio.run(read_all(world.settings.bootstrap, world.t.dlq))
        letters = [parse_headers(list(r.headers)) for r in records
                   if r.key in (m.encode(), f"pay-{m}-2".encode())]  # fmt: skip
        return [h for h in letters if "retention" in h.get(H_REASON, "")]

    world.capture(m, f"{m}-2", 900, at=w + 50)  # for the forgotten window
    world.flush()
    [letter] = wait_for(refused, timeout=60, what="the late capture refused")
    assert letter[H_KIND] == "validation"
    assert [r["revision"] for r in world.reports(m)] == [1]
