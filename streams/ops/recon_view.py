"""`paysaga recon list` and `paysaga recon show`: reconciliation windows as operators see
them, rebuilt from the committed topics (`reconciliation.reports` and
`reconciliation.discrepancies`, read_committed), so they need no worker running.

A window's state is its latest report revision; a discrepancy's is its latest record (a
RESOLVED record supersedes the OPEN one of the same id). Money is printed as integer minor
units with the currency, as everywhere in paysaga.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

from paysaga.schemas.codec import AvroCodec, DecodeError
from paysaga.schemas.registry import SchemaRegistry
from paysaga.streams.app.kafka_io import read_all
from paysaga.streams.app.settings import Settings
from paysaga.streams.app.topics import Topics

WindowKey = tuple[str, str, int]


@dataclass
class WindowView:
    """One window: its latest report, every revision seen, its discrepancies by id."""

    report: dict[str, Any]
    revisions: list[int] = field(default_factory=list)
    discrepancies: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def open(self) -> list[dict[str, Any]]:
        return [d for d in self.discrepancies.values() if d["status"] == "OPEN"]


Records = list[dict[str, Any]]


def collect(reports: Records, problems: Records) -> dict[WindowKey, WindowView]:
    """Windows by (merchant, currency, start) from the records in topic order."""
    views: dict[WindowKey, WindowView] = {}
    for r in reports:
        k = (r["merchant_id"], r["currency"], r["window_start"])
        v = views.get(k)
        if v is None:
            v = views[k] = WindowView(report=r)
        elif r["revision"] >= v.report["revision"]:
            v.report = r
        v.revisions.append(r["revision"])
    for d in problems:
        k = (d["merchant_id"], d["currency"], d["window_start"])
        v = views.get(k)
        if v is not None:  # a discrepancy's report commits in the same transaction
            v.discrepancies[d["discrepancy_id"]] = d
    return views


def parse_window_start(text: str) -> int:
    """Epoch millis, or an ISO 8601 time (UTC unless it says otherwise)."""
    if text.isdigit():
        return int(text)
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"window start {text!r} is neither epoch millis nor ISO 8601") from exc
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return int(at.timestamp() * 1000)


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def load(settings: Settings) -> dict[WindowKey, WindowView]:
    codec = AvroCodec(SchemaRegistry())
    topics = Topics(settings.topic_prefix)

    def decoded(records: list[Any], schema: str) -> list[dict[str, Any]]:
        out = []
        for r in records:
            try:
                out.append(codec.decode(r.value or b"", schema))
            except DecodeError as exc:
                print(f"warning: {r.topic}[{r.partition}]@{r.offset} undecodable: {exc}",
                      file=sys.stderr)  # fmt: skip
        return out

    reports = decoded(await read_all(settings.bootstrap, topics.recon_reports),
                      "ReconciliationReport")  # fmt: skip
    problems = decoded(await read_all(settings.bootstrap, topics.recon_discrepancies),
                       "ReconciliationDiscrepancy")  # fmt: skip
    return collect(reports, problems)


def render_list(views: dict[WindowKey, WindowView], out: TextIO, merchant: str | None = None,
                only_open: bool = False, limit: int = 50) -> int:  # fmt: skip
    rows = sorted((k for k in views if merchant is None or k[0] == merchant),
                  key=lambda k: (k[2], k[0], k[1]))  # fmt: skip
    if only_open:
        rows = [k for k in rows if views[k].open]
    table = Table(title=f"{len(rows)} reconciliation windows" + (" with open problems"
                                                               if only_open else ""))  # fmt: skip
    for col in ("merchant", "currency", "window start (UTC)", "rev", "matched", "matched minor",
                "internal", "bank", "open", "resolved"):  # fmt: skip
        table.add_column(col, justify="right" if col in ("rev", "matched", "matched minor",
                                                        "internal", "bank", "open",
                                                        "resolved") else "left")  # fmt: skip
    for k in rows[-limit:]:
        v, r = views[k], views[k].report
        resolved = sum(1 for d in v.discrepancies.values() if d["status"] == "RESOLVED")
        table.add_row(k[0], k[1], _utc(k[2]), str(r["revision"]), str(r["matched_count"]),
                      str(r["matched_minor"]), str(r["internal_count"]), str(r["bank_count"]),
                      str(len(v.open)), str(resolved))  # fmt: skip
    Console(file=out, width=160).print(table)
    return 0


def render_show(views: dict[WindowKey, WindowView], out: TextIO, merchant: str, currency: str,
                start: int) -> int:  # fmt: skip
    v = views.get((merchant, currency, start))
    console = Console(file=out, width=160)
    if v is None:
        print(f"error: no report for {merchant} {currency} window {_utc(start)} ({start})",
              file=sys.stderr)  # fmt: skip
        return 1
    r = v.report
    console.print(f"{merchant} {currency} window {_utc(r['window_start'])} .. "
                  f"{_utc(r['window_end'])}: revision {r['revision']} "
                  f"(revisions seen: {', '.join(map(str, v.revisions))}), "
                  f"report {r['report_id']}", highlight=False)  # fmt: skip
    console.print(f"  internal {r['internal_count']} for {r['internal_minor']} {currency}; "
                  f"bank {r['bank_count']} for {r['bank_minor']}; matched "
                  f"{r['matched_count']} for {r['matched_minor']}; unmatched internal "
                  f"{r['unmatched_internal_count']}, bank {r['unmatched_bank_count']}",
                  highlight=False)  # fmt: skip
    for kind, n in sorted(r["category_counts"].items()):
        console.print(f"  {kind}: {n} ({r['category_sums'].get(kind, 0)} minor)",
                      highlight=False)  # fmt: skip
    table = Table(title=f"{len(v.discrepancies)} discrepancies ({len(v.open)} open)")
    for col in ("status", "kind", "payment", "internal minor", "bank minor", "bank currency",
                "line", "rev", "id"):  # fmt: skip
        table.add_column(col)
    for d in sorted(v.discrepancies.values(), key=lambda d: (d["status"], d["kind"],
                                                              d["discrepancy_id"])):  # fmt: skip
        table.add_row(d["status"], d["kind"], d["payment_id"] or "-",
                      "-" if d["internal_minor"] is None else str(d["internal_minor"]),
                      "-" if d["bank_minor"] is None else str(d["bank_minor"]),
                      d["bank_currency"] or "-", d["line_key"] or "-", str(d["revision"]),
                      d["discrepancy_id"])  # fmt: skip
    console.print(table)
    return 0
