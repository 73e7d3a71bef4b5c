"""The reconciliation agent on the test driver: real RocksDB and Avro codec, no broker.

Stream time moves only with the inputs' event times, so windows close while the driver's
wall clock stands still."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from paysaga.agents.reconciliation import ReconAgent
from paysaga.domain.reconciliation import HOUR_MS, ReconPolicy, utc_date
from paysaga.schemas.codec import AvroCodec
from paysaga.schemas.registry import SchemaRegistry
from paysaga.streams.app.topics import Topics
from paysaga.streams.engine import Topology
from paysaga.streams.engine.deadletter import H_KIND, H_REASON
from paysaga.streams.engine.driver import TopologyTestDriver
from paysaga.streams.engine.partitioner import partition_for
from paysaga.tables.recon import RECON

CODEC = AvroCodec(SchemaRegistry())
T0 = 1_790_002_800_000 - 1_790_002_800_000 % HOUR_MS  # a window start
NAMES = Topics("")


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[TopologyTestDriver]:
    topology = Topology(serializer=CODEC.encode)
    policy = ReconPolicy(window_ms=HOUR_MS, grace_ms=HOUR_MS, tolerance_days=1)
    ReconAgent(CODEC, NAMES, 3, policy).add_to(topology)
    d = TopologyTestDriver(topology, tmp_path, partitions=3, dlq_topic=NAMES.dlq, wall_ms=T0)
    yield d
    d.close()


def capture(d: TopologyTestDriver, n: int, amount: int = 1000, at: int = T0, merchant: str = "m1",
            currency: str = "EUR", capture_id: str | None = None) -> dict[str, Any]:  # fmt: skip
    e = {"event_id": str(uuid.uuid4()), "occurred_at": at, "payment_id": f"pay-{n}",
         "correlation_id": f"ord-{n}", "causation_id": None, "amount_minor": amount,
         "currency": currency, "merchant_id": merchant, "gateway_reference": f"gw-{n}",
         "capture_id": capture_id or f"cap-{n}", "command_id": None}  # fmt: skip
    d.pipe(NAMES.captured, CODEC.encode("PaymentCaptured", e), key=f"pay-{n}".encode(),
           timestamp=at)  # fmt: skip
    return e


def bank(d: TopologyTestDriver, n: int, ref: str | None, amount: int = 1000, at: int = T0 + 60_000,
         merchant: str = "m1", currency: str = "EUR", **extra: Any) -> None:  # fmt: skip
    line = {"event_id": str(uuid.uuid4()), "occurred_at": at, "statement_id": "st-1",
            "line_id": str(n), "merchant_id": merchant, "payment_reference": ref,
            "amount_minor": amount, "currency": currency, "value_date": utc_date(at),
            "booking_date": utc_date(at), **extra}  # fmt: skip
    d.pipe(NAMES.bank_statements, CODEC.encode("BankStatementLine", line), key=merchant.encode(),
           timestamp=at)  # fmt: skip


def reports(d: TopologyTestDriver) -> list[dict[str, Any]]:
    return [CODEC.decode(o.value, "ReconciliationReport")
            for o in d.outputs(NAMES.recon_reports) if o.value]  # fmt: skip


def problems(d: TopologyTestDriver) -> list[dict[str, Any]]:
    return [CODEC.decode(o.value, "ReconciliationDiscrepancy")
            for o in d.outputs(NAMES.recon_discrepancies) if o.value]  # fmt: skip


def close_first_window(d: TopologyTestDriver, merchant: str = "m1") -> None:
    """Move the merchant's partition's stream time past the first window's end + grace."""
    bank(d, 999, None, amount=1, at=T0 + 2 * HOUR_MS, merchant=merchant)


def test_a_clean_feed_matches_everything_and_reports_once(driver: TopologyTestDriver) -> None:
    for n in range(5):
        capture(driver, n, amount=1000 + n)
    for n in range(5):
        bank(driver, n, f"gw-{n}" if n % 2 else f"pay-{n}", amount=1000 + n)
    bank(driver, 50, None, amount=1, at=T0 + 2 * HOUR_MS - 1)  # stream time just before close
    assert reports(driver) == []
    close_first_window(driver)
    (report,) = reports(driver)
    assert (report["matched_count"], report["matched_minor"]) == (5, 5010)
    assert (report["internal_count"], report["internal_minor"]) == (5, 5010)
    assert (report["bank_count"], report["bank_minor"]) == (5, 5010)
    assert report["revision"] == 1 and report["category_counts"] == {}
    assert problems(driver) == []
    close_first_window(driver)  # stream time moves on: no second report of the same window
    bank(driver, 998, None, amount=1, at=T0 + 5 * HOUR_MS)
    assert [r["window_start"] for r in reports(driver)].count(T0) == 1


def test_every_injected_discrepancy_is_found_once_in_its_category(
    driver: TopologyTestDriver,
) -> None:
    for n in range(8):
        capture(driver, n, amount=1000 * (n + 1))
    bank(driver, 0, "gw-0", amount=1000)  # matched
    # capture 1: no line at all -> MISSING_IN_BANK
    bank(driver, 2, "gw-2", amount=2999)  # AMOUNT_MISMATCH
    bank(driver, 3, "gw-3", amount=4000, currency="USD")  # CURRENCY_MISMATCH
    bank(driver, 4, "gw-4", amount=5000)
    bank(driver, 40, "gw-4", amount=5000)  # DUPLICATE_IN_BANK
    bank(driver, 5, None, amount=6000)  # tier 2: the only 6000 -> matched
    bank(driver, 60, "nobody", amount=123)  # MISSING_INTERNAL
    capture(driver, 8, amount=7000)  # 6 and 8 are both 7000 with no reference...
    bank(driver, 6, None, amount=7000)  # ... AMBIGUOUS_MATCH, never guessed
    bank(driver, 7, "pay-7", amount=8000)  # matched by payment id
    close_first_window(driver)
    (report,) = [r for r in reports(driver) if r["currency"] == "EUR" and r["window_start"] == T0]
    found = sorted((p["kind"], p["payment_id"], p["line_key"]) for p in problems(driver)
                   if p["window_start"] == T0 and p["currency"] == "EUR")  # fmt: skip
    assert found == sorted([
        ("MISSING_IN_BANK", "pay-1", None),
        ("AMOUNT_MISMATCH", "pay-2", "st-1/2"),
        ("CURRENCY_MISMATCH", "pay-3", "st-1/3"),
        ("DUPLICATE_IN_BANK", "pay-4", "st-1/40"),
        ("MISSING_INTERNAL", None, "st-1/60"),
        ("AMBIGUOUS_MATCH", None, "st-1/6"),
        ("MISSING_IN_BANK", "pay-6", None),
        ("MISSING_IN_BANK", "pay-8", None),
    ])  # fmt: skip
    assert report["matched_count"] == 4  # 0, 4, 5 (tier 2) and 7
    assert report["category_counts"]["MISSING_IN_BANK"] == 3
    assert report["unmatched_internal_count"] == 3
    assert report["unmatched_bank_count"] == 1
    ids = [p["discrepancy_id"] for p in problems(driver)]
    assert len(ids) == len(set(ids))


def test_a_repeated_capture_is_one_movement(driver: TopologyTestDriver) -> None:
    capture(driver, 1)
    capture(driver, 1)  # the gateway answered a retried CAPTURE with the same event
    bank(driver, 1, "gw-1")
    close_first_window(driver)
    (report,) = reports(driver)
    assert (report["internal_count"], report["matched_count"]) == (1, 1)
    assert problems(driver) == []


def test_a_late_line_is_an_adjustment_that_resolves_the_missing(driver: TopologyTestDriver) -> None:
    capture(driver, 1, amount=2500)
    close_first_window(driver)
    (first,) = reports(driver)
    (missing,) = problems(driver)
    assert (missing["kind"], missing["status"]) == ("MISSING_IN_BANK", "OPEN")
    assert missing["revision"] == 1
    bank(driver, 1, "gw-1", amount=2500, at=T0 + 3 * HOUR_MS)  # after the close
    revised = [r for r in reports(driver) if r["window_start"] == T0]
    assert [r["revision"] for r in revised] == [1, 2]
    assert revised[1]["matched_count"] == 1 and revised[1]["resolved_count"] == 1
    assert revised[1]["report_id"] != first["report_id"]
    resolved = problems(driver)[-1]
    assert resolved["discrepancy_id"] == missing["discrepancy_id"]
    assert (resolved["status"], resolved["revision"]) == ("RESOLVED", 2)


def test_windows_are_per_merchant_and_currency(driver: TopologyTestDriver) -> None:
    capture(driver, 1, merchant="m1", currency="EUR")
    capture(driver, 2, merchant="m1", currency="USD")
    capture(driver, 3, merchant="m2", currency="EUR")
    for m in ("m1", "m2"):
        close_first_window(driver, merchant=m)
    got = sorted((r["merchant_id"], r["currency"], r["unmatched_internal_count"])
                 for r in reports(driver) if r["window_start"] == T0)  # fmt: skip
    assert got == [("m1", "EUR", 1), ("m1", "USD", 1), ("m2", "EUR", 1)]


def test_a_bad_line_goes_to_the_dlq_and_the_window_goes_on(driver: TopologyTestDriver) -> None:
    capture(driver, 1)
    bank(driver, 1, "gw-1", currency="XXZ")  # unknown currency
    dead = driver.outputs(NAMES.dlq)
    assert len(dead) == 1 and dead[0].header(H_KIND) == b"validation"
    bank(driver, 2, "gw-1")
    close_first_window(driver)
    (report,) = reports(driver)
    assert report["matched_count"] == 1


def test_a_close_reads_a_window_larger_than_one_page(driver: TopologyTestDriver) -> None:
    many = 2_100  # tables/recon.py reads 1,000 entries a page
    for n in range(many):
        capture(driver, n, amount=100 + n)
    close_first_window(driver)
    (report,) = reports(driver)
    assert report["unmatched_internal_count"] == many
    assert len({p["payment_id"] for p in problems(driver)}) == many


def test_a_line_that_arrives_before_its_capture_is_matched_when_it_comes(
    driver: TopologyTestDriver,
) -> None:
    bank(driver, 1, "gw-1", amount=1500, at=T0 + 10)  # the capture is still on its hop
    bank(driver, 2, "gw-2", amount=1500, at=T0 + 20)
    capture(driver, 1, amount=1500, at=T0 + 30)
    capture(driver, 2, amount=1600, at=T0 + 40)  # its line says 1500: a mismatch
    close_first_window(driver)
    (report,) = reports(driver)
    assert report["matched_count"] == 1 and report["bank_count"] == 2
    assert [(p["kind"], p["line_key"]) for p in problems(driver)] == [("AMOUNT_MISMATCH", "st-1/2")]


def test_a_waiting_line_whose_window_closed_is_resolved_there_when_its_capture_comes(
    driver: TopologyTestDriver,
) -> None:
    bank(driver, 1, "gw-1", amount=900, at=T0 + 10)
    close_first_window(driver)
    (missing,) = problems(driver)
    assert missing["kind"] == "MISSING_INTERNAL"
    capture(driver, 1, amount=900, at=T0 + 2 * HOUR_MS + 5)  # a later window, still open
    last = problems(driver)[-1]
    assert (last["discrepancy_id"], last["status"]) == (missing["discrepancy_id"], "RESOLVED")
    bank(driver, 998, None, amount=1, at=T0 + 6 * HOUR_MS)  # close the capture's window
    later = [r for r in reports(driver) if r["window_start"] == T0 + 2 * HOUR_MS]
    assert later[-1]["matched_count"] == 1


def test_a_window_everything_left_closes_without_a_report(driver: TopologyTestDriver) -> None:
    bank(driver, 1, "gw-1", amount=700, at=T0 + 10)  # waits in window 1 ...
    capture(driver, 1, amount=700, at=T0 + HOUR_MS + 5)  # ... and moves to its capture's
    close_first_window(driver)
    assert [r["window_start"] for r in reports(driver)] == []
    bank(driver, 997, None, amount=1, at=T0 + 5 * HOUR_MS)
    assert [(r["window_start"], r["matched_count"]) for r in reports(driver)][:1] == [
        (T0 + HOUR_MS, 1)]  # fmt: skip


def refund(d: TopologyTestDriver, n: int, amount: int, at: int = T0 + 30_000,
           merchant: str | None = "m1", kind: str = "REFUND",
           rid: str | None = None) -> None:  # fmt: skip
    e = {"event_id": str(uuid.uuid4()), "occurred_at": at, "payment_id": f"pay-{n}",
         "correlation_id": f"ord-{n}", "causation_id": None, "kind": kind,
         "amount_minor": amount, "currency": "EUR", "reversal_id": rid or f"rev-{n}",
         "command_id": None, "merchant_id": merchant}  # fmt: skip
    d.pipe(NAMES.reversed, CODEC.encode("PaymentReversed", e), key=f"pay-{n}".encode(),
           timestamp=at)  # fmt: skip


def test_a_refund_is_a_negative_movement_matched_by_its_debit_line(
    driver: TopologyTestDriver,
) -> None:
    capture(driver, 1, amount=1000)
    refund(driver, 1, 300)  # partial, named by the capture's gateway reference
    refund(driver, 1, 300)  # the same refund re-answered: one movement
    refund(driver, 2, 999, kind="VOID")  # a void moves no money: not reconciled
    capture(driver, 3, amount=500)
    refund(driver, 3, 500, rid="rev-3")  # named by its payment id on the statement
    bank(driver, 1, "gw-1", amount=1000)
    bank(driver, 2, "gw-1", amount=300, direction="DEBIT")
    bank(driver, 3, "gw-3", amount=500)
    bank(driver, 4, "pay-3", amount=500, direction="DEBIT")
    close_first_window(driver)
    (r,) = reports(driver)
    assert (r["internal_count"], r["internal_minor"]) == (4, 1000 - 300 + 500 - 500)
    assert (r["matched_count"], r["matched_minor"]) == (4, 700)
    assert problems(driver) == [] and driver.outputs(NAMES.dlq) == []


def test_an_unmatched_refund_is_missing_in_bank_and_one_without_merchant_is_a_dead_letter(
    driver: TopologyTestDriver,
) -> None:
    capture(driver, 1, amount=1000)
    bank(driver, 1, "gw-1", amount=1000)
    refund(driver, 1, 400)
    refund(driver, 5, 100, merchant=None)
    dead = driver.outputs(NAMES.dlq)
    assert len(dead) == 1 and dead[0].header(H_KIND) == b"validation"
    close_first_window(driver)
    (p,) = problems(driver)
    assert (p["kind"], p["internal_minor"], p["movement_id"]) == ("MISSING_IN_BANK", -400, "rev-1")


def test_a_closed_window_is_forgotten_after_its_retention_and_later_arrivals_refused(
    tmp_path: Path,
) -> None:
    topology = Topology(serializer=CODEC.encode)
    policy = ReconPolicy(window_ms=HOUR_MS, grace_ms=HOUR_MS, retention_ms=2 * HOUR_MS)
    ReconAgent(CODEC, NAMES, 3, policy).add_to(topology)
    d = TopologyTestDriver(topology, tmp_path, partitions=3, dlq_topic=NAMES.dlq, wall_ms=T0)
    try:
        capture(d, 1)
        capture(d, 2, amount=2000)
        bank(d, 1, "gw-1")
        bank(d, 3, "gw-9", amount=77)  # waits for a capture that never comes
        close_first_window(d)  # stream time T0 + 2 h: closed, not yet forgotten
        assert len(reports(d)) == 1 and len(problems(d)) == 2
        part = partition_for(b"m1", 3)
        day0 = [k for k in d.table(RECON, part) if b"m1" in k and not k.startswith(b"\x01")]
        assert day0  # kept for adjustments
        bank(d, 100, None, amount=5, at=T0 + 4 * HOUR_MS)  # past close + retention
        left = {k for k in d.table(RECON, part) if not k.startswith(b"\x01")}
        first = str(T0).zfill(15).encode()
        assert not [k for k in left if first in k or k.startswith((b"M\x00", b"R\x00m1\x00gw"))]
        assert not [k for k in left if k.startswith(b"P\x00") and b"gw-9" in k]
        capture(d, 7, at=T0 + 60_000)  # for the forgotten window
        dead = d.outputs(NAMES.dlq)
        assert len(dead) == 1 and b"retention" in (dead[0].header(H_REASON) or b"")
        # The forgotten window: reported once, never revised or reopened.
        assert [r["revision"] for r in reports(d) if r["window_start"] == T0] == [1]
    finally:
        d.close()
