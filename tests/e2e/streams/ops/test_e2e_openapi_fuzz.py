"""Property-based HTTP fuzzing of a live worker against its own OpenAPI description.

schemathesis generates requests from `/openapi.json`, valid and invalid alike, for every
operation, and each answer must be no server error and must match the schema documented
for its status. The worker runs against the real broker; the payments it is asked about
exist (some created by the test, most made up by the fuzzer).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from paysaga.streams.app.topics import create_topics
from tests.support import WorkerProcess, isolated_settings

TOKEN = "fuzz-token"


@pytest.fixture(scope="module")
def worker(broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    # A short `?wait` bound: no gateway answers here, so a valid write waits it out.
    s = isolated_settings(broker.bootstrap, tmp / "state", "fuzz", web_token=TOKEN,
                          api_max_wait_ms=50)  # fmt: skip
    asyncio.run(create_topics(s))
    w = WorkerProcess(s, tmp / "worker.log").start()
    yield w
    w.kill()


def test_fuzzing_the_openapi_finds_no_server_error_and_no_answer_off_its_schema(
    worker: WorkerProcess,
) -> None:
    code, raw, _ = worker.request("/openapi.json")
    assert code == 200
    schema = schemathesis.openapi.from_dict(json.loads(raw))
    cases = st.one_of(schema.as_strategy(schemathesis.GenerationMode.POSITIVE),
                      schema.as_strategy(schemathesis.GenerationMode.NEGATIVE))  # fmt: skip
    auth = {"Authorization": f"Bearer {TOKEN}"}
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]  # fmt: skip
    statuses: dict[int, int] = {}
    ops: set[str] = set()

    @settings(max_examples=400, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=cases)
    def fuzz(case: schemathesis.Case) -> None:
        if case.operation.path == "/metrics":
            return  # text exposition, checked by its own test
        response = case.call_and_validate(base_url=worker.base_url, headers=auth,
                                          checks=checks, timeout=10)  # fmt: skip
        ops.add(case.operation.label)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    fuzz()
    # The fuzzer reached every operation, and both the happy and the refusing paths.
    assert len(ops) == sum(1 for _ in schema.get_all_operations()) - 1, ops  # all but /metrics
    assert {200, 202, 400, 404} <= set(statuses), statuses
    assert worker.ready()
