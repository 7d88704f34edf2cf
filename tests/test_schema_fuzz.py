"""schemathesis against our OpenAPI schema, on a running service: no 5xx, every 4xx with a message."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from tests.procs import Service  # noqa: E402


@pytest.fixture(scope="module")
def fuzz_service(tiny_checkpoint, tmp_path_factory):
    # small deployment limits keep every valid request quick on a CPU
    limits = {"DG_MAX_NEW_TOKENS": "64", "DG_MAX_DENOISING_STEPS": "6", "DG_MAX_PROMPT_TOKENS": "256"}
    with Service({"tiny": tiny_checkpoint}, tmp_path_factory.mktemp("fuzz"), gateway_env=limits) as svc:
        svc.up("tiny", max_batch=16)
        yield svc


def test_no_server_errors_and_every_4xx_says_why(fuzz_service):
    """Every operation of the schema, with generated valid and invalid inputs."""
    from hypothesis import given

    schema = schemathesis.openapi.from_url(fuzz_service.url + "/openapi.json")
    seen: dict[str, int] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
        def check(case):
            response = case.call(base_url=fuzz_service.url, timeout=60)
            case.validate_response(response, checks=[not_a_server_error])
            seen[f"{response.status_code // 100}xx"] = seen.get(f"{response.status_code // 100}xx", 0) + 1
            if 400 <= response.status_code < 500:
                body = response.json()
                message = body.get("detail") or (body.get("error") or {}).get("message")
                assert message, body
                assert "Traceback" not in response.text

        check()
    print(f"\nschemathesis: {len(operations)} operations, responses {seen}")
    assert seen.get("4xx") and seen.get("2xx")  # both valid and invalid inputs were exercised
