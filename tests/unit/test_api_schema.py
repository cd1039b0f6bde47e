"""Property-based run of schemathesis against the coordinator's own OpenAPI schema: never a 5xx.

Schemathesis' pytest plugin does not support pytest 9, so the test draws cases from its
hypothesis strategies directly, one operation at a time.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from coop.coordinator.http.app import create_app
from coop.pipeline.local import LocalBackend

pytestmark = pytest.mark.slow
EXAMPLES_PER_OPERATION = 40


def test_no_server_errors(tiny_chat_model_dir: str) -> None:
    app = create_app(LocalBackend(tiny_chat_model_dir, max_context=80))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"}
    seen: dict[str, set[int]] = {}
    for operation in operations:

        @settings(
            max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(case=operation.as_strategy())
        def call(case: schemathesis.Case) -> None:
            response = case.call()
            seen.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)
            assert response.status_code < 500, (
                f"{case.method} {case.path} -> {response.status_code}: {response.text[:300]}"
            )

        call()
    print(seen)
    assert any(200 in codes for codes in seen.values())
