"""Schemathesis fuzzes every route from the app's own OpenAPI document:
no 5xx, and every response matches the documented schema and status codes."""

from __future__ import annotations

import logging

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

logger = logging.getLogger(__name__)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
CASES_PER_ROUTE = 25


def test_every_route_conforms_to_the_openapi_document(serve_cluster):
    schema = schemathesis.openapi.from_url(serve_cluster.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/embeddings", "POST /embed", "POST /embed_tokens",
                                               "POST /tokenize", "GET /models", "GET /health"}
    ran = 0
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=CASES_PER_ROUTE, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        def fuzz(case) -> None:
            nonlocal ran
            ran += 1
            case.call_and_validate(base_url=serve_cluster.url, checks=CHECKS, timeout=60)

        fuzz()
    logger.warning("schemathesis ran %d cases over %d routes", ran, len(operations))
    assert ran >= 3 * len(operations)
