"""The FastAPI app every route module registers on, and the timing headers of model routes.

No ``from __future__ import annotations`` here: FastAPI reads the routes' body types at runtime.
"""

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response

from deployments.guard import RequestGuard
from deployments.http_errors import install_error_handlers
from deployments.pipeline import collect_timings, stop_timings
from deployments.schema import ErrorResponse

ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 422, 503)}

app = FastAPI(
    title="embedding-cluster",
    description="Transformer embeddings with AllenNLP's embedder semantics, served by Ray Serve.",
    version="0.1.0",
    responses=ERROR_RESPONSES,
)
install_error_handlers(app)
app.add_middleware(RequestGuard)


def timed(route: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """Add TEI's timing headers to an embedding route's answer (and ``x-merged-requests`` when the
    ingress merged its encoder call with others')."""

    @functools.wraps(route)
    async def answer(*args: Any, **kwargs: Any) -> Response:
        started = time.perf_counter()
        timings, token = collect_timings()
        try:
            response = await route(*args, **kwargs)
        finally:
            stop_timings(token)
        response.headers["x-total-time"] = f"{1000 * (time.perf_counter() - started):.2f}"
        for stage in ("tokenization", "queue", "inference"):
            if f"{stage}_ms" in timings:
                response.headers[f"x-{stage}-time"] = f"{timings[f'{stage}_ms']:.2f}"
        if "merged_requests" in timings:  # how many requests shared this one's encoder call
            response.headers["x-merged-requests"] = str(int(timings["merged_requests"]))
        return response

    return answer
