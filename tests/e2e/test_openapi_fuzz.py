"""The node's OpenAPI document and schemathesis against the live node (issue 10 item 2).

`GET /openapi.json` must list every route of the router, and schemathesis, generating requests
from that document (valid ones and, for bodies, invalid ones), must find no 5xx and no answer
that does not match the document: the success envelope or the error envelope
`{ok: false, error: {code, message, details}}` with a known code.

Examples per operation and mode are bounded (`EXAMPLES`) and the whole run has a time budget
(`BUDGET_S`), so the test stays under two minutes on the CI machine.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.openapi import openapi_path
from tests.support.node import NodeHarness, auth

EXAMPLES = 10
BUDGET_S = 75.0
CHECKS = [content_type_conformance, response_schema_conformance, status_code_conformance]


@pytest.fixture(scope="module")
def node(ray_cluster: None) -> Iterator[NodeHarness]:
    """A node of 2 shards (fewer actors: the fuzzing is about the HTTP layer)."""
    harness = NodeHarness(shards=2).start()
    yield harness
    harness.stop()


def _document(node: NodeHarness) -> dict[str, Any]:
    response = requests.get(f"{node.url}/openapi.json", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    return response.json()  # type: ignore[no-any-return]


def test_document_covers_every_route(node: NodeHarness) -> None:
    """Tried: every route of the router, with its method, is an operation of the public document;
    a write route documents its request body from its msgspec type; errors are the envelope."""
    assert node.node is not None and node.node.app is not None
    document = _document(node)
    assert document["openapi"].startswith("3.")
    routes = {
        (route.method.lower(), openapi_path(route.resource.canonical))
        for route in node.node.app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    documented = {(method, path) for path, item in document["paths"].items() for method in item}
    assert routes - documented == set()
    assert len(routes) >= 60
    post = document["paths"]["/ledger/post"]["post"]
    schema_ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    journal = document["components"]["schemas"][schema_ref.rsplit("/", 1)[1]]
    assert {"entries"} <= set(journal["required"]) and journal["additionalProperties"] is False
    error = document["components"]["schemas"]["ErrorEnvelope"]
    assert error["required"] == ["ok", "error"]
    codes = document["components"]["schemas"]["ErrorCode"]["enum"]
    assert "RATE_LIMITED" in codes and "VALIDATION_ERROR" in codes
    assert document["paths"]["/health"]["get"]["security"] == []


def _run_operation(
    operation: Any, mode: GenerationMode, headers: dict[str, str], failures: list[str], statuses: Counter[int]
) -> None:
    """Up to EXAMPLES generated requests against one operation; failures are collected, not raised."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def run(case: Any) -> None:
        response = case.call(headers=headers, timeout=30)
        statuses[response.status_code] += 1
        where = f"{case.method} {case.formatted_path} ({mode}) -> {response.status_code}"
        if response.status_code >= 500:
            failures.append(f"{where}: {response.text[:300]}")
            return
        try:
            case.validate_response(response, checks=CHECKS)
        except Exception as exc:
            failures.append(f"{where}: {str(exc)[:600]}")

    try:
        run()
    except Unsatisfiable:  # e.g. no invalid body exists for a schema that accepts any JSON
        return


def test_schemathesis_finds_no_server_error(node: NodeHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tried: schemathesis' generated requests, valid and invalid, as admin against every operation:
    no 5xx, and every answer (success or error) matches the document and the envelope."""
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", "whsec_fuzz")  # read per request: signatures are checked
    statuses: Counter[int] = Counter()
    schema = schemathesis.openapi.from_url(f"{node.url}/openapi.json")
    headers = auth("admin")
    failures: list[str] = []
    operations = 0
    started = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        modes = [GenerationMode.POSITIVE]
        if operation.body:
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            if time.monotonic() - started > BUDGET_S:
                break
            _run_operation(operation, mode, headers, failures, statuses)
    print(f"schemathesis: {operations} operations, {sum(statuses.values())} requests, {dict(statuses)}")
    assert operations >= 60
    assert sum(statuses.values()) >= 5 * operations  # the budget did not cut the run short
    assert sum(n for status, n in statuses.items() if status < 300) >= 20  # some requests got through
    assert failures == [], "\n".join(failures[:20])
