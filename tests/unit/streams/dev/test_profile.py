"""The profile report: py-spy's collapsed stacks summed by stage, innermost frame first."""

from __future__ import annotations

from pathlib import Path

from paysaga.streams.dev.profile import OTHER, report, stage_of, stage_table

RUN = "TaskRunner.run_records (streams/engine/runner.py:300)"
SAGA = "SagaAgent._commit (agents/saga.py:290)"
ENCODE = "AvroCodec.encode (schemas/codec.py:99)"


def test_the_innermost_matching_frame_decides() -> None:
    assert stage_of([RUN, SAGA, ENCODE, "_write (schemas/codec.py:195)"]) == (
        "encode outputs (Avro)"
    )
    assert stage_of([RUN, SAGA]) == "agent glue"
    assert stage_of([RUN]) == "engine: run loop"
    assert stage_of(["<module> (faust/__init__.py:1)"]) == OTHER


def test_report_shares_add_up(tmp_path: Path) -> None:
    raw = tmp_path / "worker.raw"
    proc = 'process 1:"python -m paysaga.streams.ops.cli worker"'
    raw.write_text(f"{proc};{RUN};{SAGA};{ENCODE} 3\n{proc};{RUN} 1\n")
    rep = report(raw)
    assert rep["samples"] == 4
    assert rep["stages"] == {"encode outputs (Avro)": 0.75, "engine: run loop": 0.25}
    table = stage_table(rep, cpu_ms_per_payment=1.0, inputs=5.0)
    assert "encode outputs (Avro)" in table and "750" in table and "150" in table
