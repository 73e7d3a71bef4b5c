"""What `paysaga recon list/show` make of the report and discrepancy records."""

from __future__ import annotations

import io
from typing import Any

import pytest

from paysaga.streams.ops.recon_view import collect, parse_window_start, render_list, render_show

START = 1_790_002_800_000


def report(revision: int, merchant: str = "m1", **extra: Any) -> dict[str, Any]:
    return {"report_id": f"r{revision}", "merchant_id": merchant, "currency": "EUR",
            "window_start": START, "window_end": START + 3_600_000, "matched_count": 3,
            "matched_minor": 3000, "unmatched_internal_count": 1,
            "unmatched_internal_minor": 500, "unmatched_bank_count": 0,
            "unmatched_bank_minor": 0, "generated_at": START, "revision": revision,
            "internal_count": 4, "internal_minor": 3500, "bank_count": 3, "bank_minor": 3000,
            "category_counts": {"MISSING_IN_BANK": 1}, "category_sums": {"MISSING_IN_BANK": 500},
            "resolved_count": 0, **extra}  # fmt: skip


def problem(status: str, revision: int, did: str = "d1") -> dict[str, Any]:
    return {"discrepancy_id": did, "report_id": f"r{revision}", "merchant_id": "m1",
            "currency": "EUR", "kind": "MISSING_IN_BANK", "payment_id": "pay-1",
            "internal_minor": 500, "bank_minor": None, "window_start": START,
            "window_end": START + 3_600_000, "detected_at": START, "revision": revision,
            "status": status, "movement_id": "cap-1", "line_key": None,
            "bank_currency": None}  # fmt: skip


def test_the_latest_revision_and_the_latest_record_of_each_problem_win() -> None:
    reports = [report(1), report(2), report(1, merchant="m2")]
    views = collect(reports, [problem("OPEN", 1), problem("RESOLVED", 2), problem("OPEN", 1, "d2")])
    v = views[("m1", "EUR", START)]
    assert v.report["revision"] == 2 and v.revisions == [1, 2]
    assert [d["discrepancy_id"] for d in v.open] == ["d2"]
    assert views[("m2", "EUR", START)].discrepancies == {}


def test_list_filters_by_merchant_and_open_problems_and_show_prints_money_as_minor_units() -> None:
    views = collect([report(1), report(1, merchant="m2")], [problem("OPEN", 1)])
    out = io.StringIO()
    render_list(views, out, only_open=True)
    text = out.getvalue()
    assert "1 reconciliation windows with open problems" in text and "m2" not in text
    out = io.StringIO()
    assert render_show(views, out, "m1", "EUR", START) == 0
    text = out.getvalue()
    assert "internal 4 for 3500 EUR" in text and "MISSING_IN_BANK: 1 (500 minor)" in text
    assert "pay-1" in text and "OPEN" in text
    assert render_show(views, io.StringIO(), "m1", "USD", START) == 1


def test_a_window_start_is_epoch_millis_or_iso_8601_in_utc() -> None:
    assert parse_window_start(str(START)) == START
    assert parse_window_start("2026-09-21T15:00:00Z") == parse_window_start("2026-09-21T15:00:00")
    assert parse_window_start("2026-09-21T17:00:00+02:00") == parse_window_start(
        "2026-09-21T15:00:00Z"
    )
    with pytest.raises(ValueError, match="neither epoch millis nor ISO 8601"):
        parse_window_start("yesterday")
