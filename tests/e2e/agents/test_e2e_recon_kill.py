"""Reconciliation through SIGKILL: no window lost, none reported twice, nothing matched twice.

Captures and bank lines (each line 200 ms of event time after its capture) are paced onto
the broker while windows of 2 s with 1 s of grace close all the time. The worker is killed
at random moments (windows closing in its batches), killed again while it recovers, and once
restarted with its local state deleted. A capture takes the repartition hop and its line
does not, and kills make both lag, so lines wait for their captures and windows close
before what belongs in them arrived: those are adjustments, new revisions. At the end,
reading committed output only:

- every revision of every window is reported exactly once (revisions 1..N, no report id
  twice);
- the last revisions account for every capture and every line exactly once;
- the discrepancies still open (OPEN minus RESOLVED, in order) are exactly the injected ones.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from paysaga.domain.reconciliation import utc_date
from paysaga.streams.app.topics import create_topics
from paysaga.streams.dev.broker import LocalBroker
from tests.recon_support import CODEC, ReconWorld, new_id
from tests.support import (
    PacedProducer,
    WorkerProcess,
    isolated_settings,
    kill_losing_state,
    kill_repeatedly,
    run,
    wait_for,
)

#: An hour ago: the broker refuses timestamps an hour ahead; 4 ms of event time per input.
BASE = (int(time.time() * 1000) - 3_600_000) // 2_000 * 2_000
MERCHANTS = ("m-a", "m-b", "m-c")
N = 20_000  # bounds the test only: the load stops after the kills


def _missing(i: int) -> bool:
    return i % 37 == 5


def _wrong(i: int) -> bool:
    return i % 41 == 7


def _loads() -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]], list[int]]:
    """Captures, lines, and the capture index of each line."""
    captures, lines, of = [], [], []
    for i in range(N):
        m, at = MERCHANTS[i % len(MERCHANTS)], BASE + 4 * i
        cap = {"event_id": new_id(), "occurred_at": at, "payment_id": f"pay-{i}",
               "correlation_id": f"ord-{i}", "causation_id": None, "amount_minor": 1000 + i,
               "currency": "EUR", "merchant_id": m, "gateway_reference": f"gw-{i}",
               "capture_id": f"cap-{i}", "command_id": None}  # fmt: skip
        captures.append((f"pay-{i}".encode(), CODEC.encode("PaymentCaptured", cap)))
        if _missing(i):
            continue
        amount = 1000 + i + (100_000 if _wrong(i) else 0)
        line = {"event_id": new_id(), "occurred_at": at + 200, "statement_id": f"st-{m}",
                "line_id": str(i), "merchant_id": m, "payment_reference": f"gw-{i}",
                "amount_minor": amount, "currency": "EUR", "value_date": utc_date(at),
                "booking_date": utc_date(at)}  # fmt: skip
        lines.append((m.encode(), CODEC.encode("BankStatementLine", line)))
        of.append(i)
    return captures, lines, of


def _state(world: ReconWorld) -> tuple[dict[tuple[Any, ...], dict[str, Any]], list[Any]]:
    """The last revision of every window, and the discrepancies open now."""
    reports = world.reports()
    ids = [r["report_id"] for r in reports]
    assert len(ids) == len(set(ids)), "a report revision was emitted twice"
    by_window: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    last: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in reports:
        w = (r["merchant_id"], r["currency"], r["window_start"])
        by_window[w].append(r["revision"])
        if r["revision"] > last.get(w, {"revision": 0})["revision"]:
            last[w] = r
    for w, revs in by_window.items():
        assert sorted(revs) == list(range(1, len(revs) + 1)), f"window {w}: revisions {revs}"
    open_now: dict[str, tuple[str, str | None]] = {}
    for d in world.discrepancies():
        if d["status"] == "OPEN":
            open_now[d["discrepancy_id"]] = (d["kind"], d["payment_id"])
        else:
            open_now.pop(d["discrepancy_id"], None)
    return last, list(open_now.values())  # a list: every stray line is (MISSING_INTERNAL, None)


def _accounted(world: ReconWorld) -> int:
    last, _ = _state(world)
    return sum(r["internal_count"] for r in last.values())


@pytest.mark.slow
def test_reconciliation_through_kills_and_a_lost_state(broker: LocalBroker, tmp_path: Path) -> None:
    settings = isolated_settings(
        broker.bootstrap, tmp_path / "state", "rk", app_id="eos-recon", max_batch=100,
        session_timeout_ms=6000, idle_ms=1000, recon_window_ms=2_000, recon_grace_ms=1_000,
    )  # fmt: skip
    run(create_topics(settings))
    world = ReconWorld(settings)
    captures, lines, line_of = _loads()
    cap_load = PacedProducer(settings, world.t.captured, captures, 300)
    line_load = PacedProducer(settings, world.t.bank_statements, lines, 300 * len(lines) / N)
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    cap_load.start()
    line_load.start()
    rng = random.Random(19)
    try:
        recovering = kill_repeatedly(worker, 3, lambda: _accounted(world), 150, cap_load, rng)
        kill_losing_state(worker, lambda: _accounted(world), 150)
        for load in (cap_load, line_load):
            load.stop()
            load.join(30)
            assert load.error is None and not load.is_alive()
        sent = set(range(cap_load.sent))
        lined = {line_of[j]: j for j in range(line_load.sent)}
        expected = (
            {("MISSING_IN_BANK", f"pay-{i}") for i in sent if i not in lined}
            | {("AMOUNT_MISMATCH", f"pay-{i}") for i in sent if i in lined and _wrong(i)}
        )  # fmt: skip
        strays = sum(1 for i in lined if i not in sent)  # lines whose capture was not sent
        good = [i for i in sent if i in lined and not _wrong(i)]

        seen: list[Any] = []

        def settled() -> bool:
            last, open_now = _state(world)
            bank = sum(r["bank_count"] for r in last.values())
            internal = sum(r["internal_count"] for r in last.values())
            strays_open = sum(1 for p in open_now if p[0] == "MISSING_INTERNAL")
            named = [p for p in open_now if p[0] != "MISSING_INTERNAL"]
            others = set(named)
            assert len(named) == len(others), "one problem is open under two ids"
            seen[:] = [(internal, len(sent)), (bank, line_load.sent), (strays_open, strays),
                       sorted(others - expected)[:5], sorted(expected - others)[:5]]  # fmt: skip
            return (internal, bank, strays_open) == (len(sent), line_load.sent, strays) and (
                others == expected
            )

        try:
            wait_for(settled, 120, what="every capture and line accounted, the injected open")
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}: (got, want) captures, lines, strays open; open "
                f"and not injected; injected and not open: {seen}"
            ) from None
    except AssertionError as exc:
        raise AssertionError(f"{exc}; {worker.diagnosis()}") from None
    finally:
        worker.stop()
    last, _ = _state(world)
    matched = sum(r["matched_count"] for r in last.values())
    assert matched == len(good)  # each capture matched at most once, every good one once
    assert sum(r["matched_minor"] for r in last.values()) == sum(1000 + i for i in good)
    revised = sum(1 for r in last.values() if r["revision"] > 1)
    print(f"\nrecon kill test: {len(sent)} captures, {line_load.sent} lines, {len(last)} windows "
          f"({revised} revised by late arrivals), "
          f"{matched} matched once; 3 kills, {recovering} while recovering, one losing its "
          f"state")  # fmt: skip
