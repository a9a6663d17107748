"""``RequestGuard``: what every HTTP request passes before its body is read: the API key, the
limit of requests in flight, and the body size limit."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from fastapi import HTTPException

from deployments.errors import OverloadedError, PayloadTooLargeError, UnauthorizedError
from deployments.http_errors import error_response, request_id_of
from deployments.settings import ServingSettings

#: Routes answered without the API key and outside the in-flight limit (probes must always get through).
PROBES = ("/health", "/ready")


class RequestGuard:
    """ASGI middleware: 401 without the API key (every route but the probes), 503 past
    ``max_requests_in_flight`` (shedding load costs this replica next to nothing, so refusals stay
    fast while it is saturated), 413 for a body over the limit (at once when Content-Length says so,
    else as soon as a streamed body passes it). The replica puts its settings in ``app.state.serving``."""

    def __init__(self, app: Callable) -> None:
        self.app = app
        self.in_flight = 0

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        settings: ServingSettings | None = getattr(scope["app"].state, "serving", None) if "app" in scope else None
        if scope["type"] != "http" or settings is None:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        if path in PROBES:
            return await self.app(scope, receive, send)
        request_id = request_id_of(scope)
        if settings.api_key is not None and not has_api_key(headers, settings.api_key):
            error = UnauthorizedError("missing or wrong API key (send 'Authorization: Bearer <key>')")
            return await error_response(error, request_id)(scope, receive, send)
        if self.in_flight >= settings.limits.max_requests_in_flight:
            error = OverloadedError(f"this ingress has {self.in_flight} requests in flight, its limit; retry shortly")
            return await error_response(error, request_id)(scope, receive, send)
        self.in_flight += 1
        try:
            await self._within_body_limit(scope, receive, send, headers, settings.limits.max_body_bytes)
        finally:
            self.in_flight -= 1

    async def _within_body_limit(self, scope: dict, receive: Callable, send: Callable, headers: dict,
                                 limit: int) -> None:
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return await error_response(_too_large(int(length), limit), request_id_of(scope))(scope, receive, send)
        received = 0

        async def counting_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                # FastAPI turns other exceptions raised while it reads a body into a plain 400
                raise HTTPException(413, detail=_too_large(received, limit).message)
            return message

        await self.app(scope, counting_receive, send)


def has_api_key(headers: dict[bytes, bytes], key: str) -> bool:
    """``Authorization: Bearer <key>`` (what the openai client sends) or ``X-API-Key``, compared in constant time."""
    given = headers.get(b"authorization", b"")
    token = given[7:] if given[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
    return hmac.compare_digest(token, key.encode())


def _too_large(size: int, limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"the body has {size} bytes or more, over the limit max_body_bytes={limit}")
