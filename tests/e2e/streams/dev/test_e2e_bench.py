"""`paysaga bench` end to end on a small data set: it runs, measures, and reports.

Figures are never asserted (the machines are shared and noisy). What is asserted is what a
user relies on: every pipeline processed the whole data set, the latency and RSS figures
were taken, the ratios are against the baseline of the same run, the restore phase
restored every key, and the summary table and the JSON results agree.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from paysaga.streams.dev.broker import LocalBroker


def test_bench_runs_all_three_pipelines_and_the_restore(
    broker: LocalBroker, tmp_path: Path
) -> None:
    events, keys = 400, 3000
    results = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "paysaga.streams.ops.cli", "bench", "--bootstrap", broker.bootstrap,
         "--events", str(events), "--rate", "200", "--latency-seconds", "2",
         "--latency-warmup-seconds", "1",
         "--keys", str(keys), "--saga-payments", "300", "--results-dir", str(results),
         "--profile", str(tmp_path / "profile")],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]

    [path] = list(results.glob("bench*.json"))
    report = json.loads(path.read_text())
    assert set(report["pipelines"]) == {"baseline", "faust", "paysaga"}
    base = report["pipelines"]["baseline"]["events_per_s"]
    for kind, r in report["pipelines"].items():
        assert r["extra"]["outputs"] >= events, f"{kind} did not process the whole data set"
        assert r["events_per_s"] > 0 and r["peak_rss_mib"] > 0, kind
        assert 0 < r["p50_ms"] <= r["p99_ms"], kind
        assert r["ratio_to_baseline"] == r["events_per_s"] / base
    restore = report["restore"]
    assert restore["keys"] == keys and restore["restored_records"] == keys
    assert restore["restore_records_per_s"] > 0 and restore["restart_to_ready_s"] > 0

    # The table printed at the end is the JSON's, one row per pipeline.
    table = done.stdout[done.stdout.index(f"paysaga bench {report['run']}") :]
    for kind, r in report["pipelines"].items():
        row = next(line for line in table.splitlines() if line.split()[:1] == [kind]
                   and len(line.split()) == 6)  # fmt: skip
        assert f"{r['events_per_s']:,.0f}" in row and f"{r['p99_ms']:.1f}" in row
    assert f"restore: {keys:,} changelog records" in table
    # The whole saga: every saga of the backlog ended, each process's CPU apart, latency.
    saga = report["saga"]
    assert saga["ended"] == saga["payments"] > 250
    assert saga["payments_per_s"] > 0 and saga["payments_per_s_first_90"] > 0
    assert set(saga["cpu_seconds"]) == {"worker", "gateway", "inventory", "shipping", "broker"}
    assert saga["cpu_seconds"]["worker"] > 0 and saga["worker_cpu_ms_per_payment"] > 0
    lat = saga["latency"]
    assert lat["samples"] > 0 and 0 < lat["p50_ms"] <= lat["p95_ms"] <= lat["p99_ms"]
    assert f"whole saga: {saga['payments']:,} payments" in table
    # Inputs per payment: intake, maybe its repartition hop, the saga's answers.
    assert 4 < saga["inputs_per_payment"] < 12 and saga["inputs_per_batch"] >= 1
    # The profile: py-spy's samples of the worker, by stage, and the table of them.
    prof = saga["profile"]
    assert prof["samples"] > 0 and Path(prof["raw"]).stat().st_size > 0
    assert abs(sum(prof["stages"].values()) - 1) < 1e-9
    assert "worker CPU by stage" in table
    assert f"results: {path}" in done.stdout


def test_bench_measures_reconciliation_s_open_captures(broker: LocalBroker, tmp_path: Path) -> None:
    """`--recon-open N`: N captures written, a reconciliation-only worker commits every one
    of them (and their re-keyed copies) into open windows; its memory and state reported."""
    results = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "paysaga.streams.ops.cli", "bench", "--bootstrap", broker.bootstrap,
         "--events", "0", "--keys", "0", "--saga-payments", "0", "--recon-open", "3000",
         "--results-dir", str(results)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    [path] = list(results.glob("bench*.json"))
    recon = json.loads(path.read_text())["recon"]
    assert recon["captures"] == 3000 and recon["merchants"] == 1000
    assert recon["captures_per_s"] > 0 and recon["peak_rss_mib"] > 0 and recon["state_mib"] > 0
    assert "reconciliation state: 3,000 open captures of 1,000 merchants" in done.stdout
