"""schemathesis against the sidecar's own OpenAPI document: every operation, data that fits the
schema and data that does not, with the admin token and without it. No answer may be a 5xx, and
answers with a documented status must match the document."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Err
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
)

from sidecar.testing.serving import ApiClient
from tests.support.auth import ADMIN_TOKEN

EXAMPLES = 40  # per operation, mode and credential set
CREDENTIALS = {
    "admin": {"Authorization": f"Bearer {ADMIN_TOKEN}", "x-sidecar-token": ADMIN_TOKEN},
    "none": {},
}
Check = Callable[..., Any]
Operation = schemathesis.APIOperation[Any, Any, Any, Any]
CHECKS: dict[GenerationMode, list[Check]] = {
    GenerationMode.POSITIVE: [
        not_a_server_error,
        response_schema_conformance,
        content_type_conformance,
    ],
    # Data that breaks the schema must be refused, and refused with a 4xx.
    GenerationMode.NEGATIVE: [not_a_server_error],
}


class Fuzzer:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.session = requests.Session()
        self.sent = 0

    def runner(
        self, operation: Operation, mode: GenerationMode, headers: dict[str, str]
    ) -> Callable[[], None]:
        checks = CHECKS[mode]

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case: schemathesis.Case[Operation]) -> None:
            response = case.call(
                base_url=self.base_url, session=self.session, headers=headers, timeout=10
            )
            self.sent += 1
            case.validate_response(response, checks=checks, headers=headers)

        return run


def document(base_url: str) -> dict[str, Any]:
    """The served OpenAPI document, with one correction: Litestar documents a `{ref:path}`
    parameter as a URI, while the identity routes take any percent-encoded string there (they
    read it from the raw path); generating only URIs would leave those routes untested."""
    doc: dict[str, Any] = requests.get(f"{base_url}/schema/openapi.json", timeout=10).json()
    for operations in doc["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path":
                    parameter["schema"] = {"type": "string", "minLength": 1}
    return doc


def negatable(operation: Operation) -> bool:
    return bool(list(operation.iter_parameters()) or operation.body)


def fuzz(base_url: str) -> tuple[list[str], int]:
    """Failures (one per operation, mode and credential set that found one) and the number of
    requests sent."""
    schema = schemathesis.openapi.from_dict(document(base_url))
    operations = []
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise result.err()  # a document schemathesis cannot read is a failure too
        operations.append(result.ok())
    assert len(operations) >= 9, [op.label for op in operations]
    fuzzer = Fuzzer(base_url)
    failures: list[str] = []
    for operation in operations:
        for mode in CHECKS:
            if mode is GenerationMode.NEGATIVE and not negatable(operation):
                continue  # nothing in the request that the document constrains
            for who, headers in CREDENTIALS.items():
                try:
                    fuzzer.runner(operation, mode, headers)()
                except Unsatisfiable as exc:
                    # A lone path parameter has no invalid value that still reaches the route.
                    if mode is GenerationMode.POSITIVE:
                        failures.append(f"{operation.label} [{mode.value}, {who}]: {exc}")
                # Every operation is tried and every failure reported (FailureGroup is a
                # BaseExceptionGroup of the checks' failures).
                except (Exception, FailureGroup) as exc:
                    failures.append(f"{operation.label} [{mode.value}, {who}]: {exc}"[:3000])
    fuzzer.session.close()
    return failures, fuzzer.sent


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_no_operation_answers_a_server_error(api: ApiClient) -> None:
    # schemathesis is synchronous: it runs in a thread while the server runs in this loop.
    failures, sent = await asyncio.to_thread(fuzz, str(api.base_url).rstrip("/"))
    assert not failures, "\n\n".join(failures)
    assert sent >= 200  # the fuzzing did happen
