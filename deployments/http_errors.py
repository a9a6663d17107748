"""Errors as HTTP answers: every error is JSON, ``{"error": {"message", "type", "code", "param",
"request_id"}}``, and a server fault is logged once, with its traceback and request id, while the
client gets no traceback."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.errors import BadRequestError, EmbeddingRequestError, PayloadTooLargeError, cause_of
from deployments.validation import problems_message

logger = logging.getLogger(__name__)

RETRY_AFTER_S = "1"
#: Serve's proxy puts the client's request id (or a new one) in this header of every request and answer.
REQUEST_ID_HEADER = "x-request-id"


class JSONBytesResponse(Response):
    """JSON through orjson, numpy arrays included (far faster than lists of Python floats)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def request_id_of(scope: dict) -> str | None:
    """The request's id, as Serve's proxy set it (the client's ``X-Request-Id`` or a new one)."""
    for name, value in scope.get("headers", ()):
        if name == REQUEST_ID_HEADER.encode():
            return value.decode("latin-1")
    return None


def error_body(message: str, error_type: str, code: int, request_id: str | None = None) -> Response:
    """The JSON of every error."""
    headers = {"Retry-After": RETRY_AFTER_S} if code == 503 else None
    body = {"error": {"message": message, "type": error_type, "code": code, "param": None,
                      "request_id": request_id}}
    return JSONBytesResponse(body, status_code=code, headers=headers)


def error_response(error: EmbeddingRequestError, request_id: str | None = None) -> Response:
    return error_body(error.message, error.error_type, error.status_code, request_id)


async def _request_error(request: Request, error: EmbeddingRequestError) -> Response:
    return error_response(error, request_id_of(request.scope))


async def _validation_error(request: Request, error: RequestValidationError) -> Response:
    request_id = request_id_of(request.scope)
    problems = error.errors()
    if any(p.get("type") == "json_invalid" for p in problems):
        return error_response(BadRequestError("malformed JSON body"), request_id)
    return error_body(problems_message(problems), "invalid_request_error", 422, request_id)


async def _http_error(request: Request, error: StarletteHTTPException) -> Response:
    error_type = PayloadTooLargeError.error_type if error.status_code == 413 else "http_error"
    response = error_body(str(error.detail), error_type, error.status_code, request_id_of(request.scope))
    response.headers.update(error.headers or {})
    return response


async def server_error(request: Request, error: Exception) -> Response:
    """A fault of the server's: logged here once, with the traceback and the request id."""
    request_id = request_id_of(request.scope)
    logger.error("request %s to %s failed: %s", request_id, request.url.path, type(cause_of(error)).__name__,
                 exc_info=error)
    return error_body(f"internal error; it has been logged under request id {request_id}", "server_error", 500,
                      request_id)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` as JSON."""
    app.add_exception_handler(EmbeddingRequestError, _request_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, server_error)
