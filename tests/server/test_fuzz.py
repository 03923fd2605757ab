"""schemathesis against /openapi.json, valid and invalid inputs: the server never answers 5xx.

The schema is loaded from the live server at run time, so each operation is driven through
schemathesis' Hypothesis strategies inside a plain test.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, note, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

# Bounded so the whole fuzz run stays well under a minute on two busy cores.
MAX_EXAMPLES = 15
# Generated bodies may ask for long generations; clamp them so each case is quick. Clamping
# keeps a valid body valid and leaves the invalid parts of a negative case alone.
CLAMPS = {"max_tokens": 4, "max_completion_tokens": 4, "n": 2, "min_tokens": 2}


def _clamp(body: object) -> None:
    if not isinstance(body, dict):
        return
    for key, cap in CLAMPS.items():
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > cap:
            body[key] = cap


def _fuzz(operation, mode: GenerationMode) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def check(case):
        _clamp(case.body)
        note(f"{operation.method.upper()} {operation.path}: {case.body!r:.300}")
        response = case.call(timeout=30)
        assert response.status_code < 500, response.text[:300]
        case.validate_response(response, checks=[not_a_server_error])

    check()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_generated_input_makes_the_server_fail(server, mode):
    schema = schemathesis.openapi.from_url(server.base_url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and not operation.body:
            continue  # no body: nothing a client can get wrong in a schema-visible way
        _fuzz(operation, mode)
