"""Fuzzing ``persia serve`` from its own OpenAPI schema with schemathesis (pinned in
constraints.txt; seeded; a capped number of examples per operation): no request gets a 5xx, and
the server answers afterwards. Against real servers on 127.0.0.1: an export and a checkpoint."""

from __future__ import annotations

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

#: Examples per operation and phase: enough to reach every refusal path, seconds per run.
MAX_EXAMPLES = 20


@pytest.fixture(params=["export", "checkpoint"])
def served(request):
    return request.getfixturevalue(f"{request.param}_server")


@pytest.fixture
def api_schema(served):
    return schemathesis.openapi.from_url(f"{served.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,  # seeded: the same examples every run
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_request_gets_a_server_error(case, served):
    case.call_and_validate(checks=[not_a_server_error])
    assert httpx.get(f"{served.url}/healthz", timeout=30).status_code == 200
