"""The ingress's gRPC methods: Hugging Face TEI's ``tei.v1`` API (``Info``, ``Embed``, ``Rerank``),
so that a client built from TEI's proto works unchanged.

Serve's gRPC servers (its Python proxy's; under HAProxy, each ingress replica's own, behind HAProxy's
gRPC frontend) register the servicer functions ``deployments.protos.SERVICER_FUNCTIONS`` names and
call, for each call, the ingress method named after the rpc with the request message and a
``grpc_context``. Each method takes the way the HTTP routes take (the same validation, limits,
merged encoder calls and metrics, route ``grpc``) and answers a client's error with its gRPC
status code and the HTTP answer's message.
"""

from __future__ import annotations

import importlib.metadata
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import Message
from ray.serve.grpc_util import RayServegRPCContext

from deployments.errors import (
    BadRequestError,
    EmbeddingRequestError,
    OverloadedError,
    PayloadTooLargeError,
    UnauthorizedError,
)
from deployments.guard import has_api_key
from deployments.pipeline import collect_timings, stop_timings
from deployments.protos import tei_pb2
from deployments.rerank_schema import RerankRequest
from deployments.schema import EmbedRequest
from deployments.scoring_pipeline import ScoringPipeline
from deployments.validation import parse_request

logger = logging.getLogger(__name__)

#: The gRPC status of each client error (by its HTTP status). Too large is INVALID_ARGUMENT, as TEI
#: answers an input over its limits: RESOURCE_EXHAUSTED means "overloaded, retry" to TEI's clients.
GRPC_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
              404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.INVALID_ARGUMENT,
              503: grpc.StatusCode.UNAVAILABLE}
TRUNCATION_DIRECTIONS = {tei_pb2.TRUNCATION_DIRECTION_RIGHT: "right", tei_pb2.TRUNCATION_DIRECTION_LEFT: "left"}
#: TEI's model type of each kind of served model (TEI serves SPLADE models as embedding models).
MODEL_TYPES = {"embedding": tei_pb2.MODEL_TYPE_EMBEDDING, "sparse": tei_pb2.MODEL_TYPE_EMBEDDING,
               "reranker": tei_pb2.MODEL_TYPE_RERANKER, "classifier": tei_pb2.MODEL_TYPE_CLASSIFIER}
#: The request metadata that picks a served model (TEI serves one; here the first one without it).
MODEL_KEY = "model"

try:
    VERSION = importlib.metadata.version("embedding-cluster")
except importlib.metadata.PackageNotFoundError:  # the packages put on the path without being installed
    VERSION = ""


def _optional(message: Message, field: str) -> Any:
    """An ``optional`` field's value, ``None`` when the client left it unset."""
    return getattr(message, field) if message.HasField(field) else None


def _direction(value: int) -> str:
    try:
        return TRUNCATION_DIRECTIONS[value]
    except KeyError:
        raise BadRequestError(f"truncation_direction {value} is not one of TEI's (0: right, 1: left)") from None


def _add_times(metadata: Message, timings: dict[str, float], started: float) -> None:
    """TEI's ``Metadata`` times, in nanoseconds: the whole call's and each stage's (as the HTTP
    routes' ``x-*-time`` headers give them in milliseconds)."""
    for stage in ("tokenization", "queue", "inference"):
        setattr(metadata, f"{stage}_time_ns", int(1e6 * timings.get(f"{stage}_ms", 0.0)))
    metadata.total_time_ns = int(1e9 * (time.perf_counter() - started))


class TEIServices(ScoringPipeline):
    """TEI's rpcs as methods of the ingress (``Info``, ``Embed``, ``Rerank``). Each checks the API
    key (``authorization: Bearer <key>`` or ``x-api-key`` metadata, as HTTP does) and the ingress's
    ``max_requests_in_flight`` (gRPC calls counted apart from HTTP requests); the ``model`` metadata
    picks a served model, the first one without it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._grpc_in_flight = 0

    async def Info(self, request: Message, grpc_context: RayServegRPCContext) -> Message:
        """TEI's ``Info``: the model's id, dtype, type and the limits a request meets."""
        return await self._grpc_answer(request, grpc_context, tei_pb2.InfoResponse, self._info)

    async def Embed(self, request: Message, grpc_context: RayServegRPCContext) -> Message:
        """TEI's ``Embed``: one text's pooled vector, as ``POST /embed`` gives it (``normalize`` unset:
        the model's own, as on ``/embed``; TEI would normalize)."""
        return await self._grpc_answer(request, grpc_context, tei_pb2.EmbedResponse,
                                       lambda model: self._embed(request, model))

    async def Rerank(self, request: Message, grpc_context: RayServegRPCContext) -> Message:
        """TEI's ``Rerank``: every text scored against the query, best first, as ``POST /rerank``."""
        return await self._grpc_answer(request, grpc_context, tei_pb2.RerankResponse,
                                       lambda model: self._rerank(request, model))

    async def _grpc_answer(self, request: Message, context: RayServegRPCContext, empty: Callable[[], Message],
                           answer: Callable[[str | None], Awaitable[Message]]) -> Message:
        """``answer(model)``, within the API key, in-flight and message-size (``max_body_bytes``, as
        HTTP's body) checks, its ``metadata`` timed; a client's
        error as its status code and message (and an ``empty()`` message), a server fault logged with
        its traceback and answered INTERNAL without it."""
        started = time.perf_counter()
        invocation = dict(context.invocation_metadata())
        timings, token = collect_timings()
        try:
            self._check_grpc_access(invocation)
            if (size := request.ByteSize()) > self._limits.max_body_bytes:
                raise PayloadTooLargeError(f"the message has {size} bytes, over the limit "
                                           f"max_body_bytes={self._limits.max_body_bytes}")
            self._grpc_in_flight += 1
            try:
                response = await answer(invocation.get(MODEL_KEY))
            finally:
                self._grpc_in_flight -= 1
            if "metadata" in response.DESCRIPTOR.fields_by_name:
                _add_times(response.metadata, timings, started)
            return response
        except EmbeddingRequestError as error:
            context.set_code(GRPC_CODES.get(error.status_code, grpc.StatusCode.INVALID_ARGUMENT))
            context.set_details(error.message)
        except Exception as error:
            request_id = dict(context.trailing_metadata()).get("request_id")
            logger.error("gRPC request %s failed: %s", request_id, type(error).__name__, exc_info=error)
            context.set_code(grpc.StatusCode.INTERNAL)
            context.set_details(f"internal error; it has been logged under request id {request_id}")
        finally:
            stop_timings(token)
        return empty()

    def _check_grpc_access(self, metadata: dict[str, str | bytes]) -> None:
        """The API key, checked as HTTP checks it, and the in-flight limit."""
        key = self._settings.api_key
        if key is not None:
            headers = {name.encode(): value.encode() for name, value in metadata.items() if isinstance(value, str)}
            if not has_api_key(headers, key):
                raise UnauthorizedError("missing or wrong API key (send 'Authorization: Bearer <key>')")
        if self._grpc_in_flight >= self._limits.max_requests_in_flight:
            raise OverloadedError(f"this ingress has {self._grpc_in_flight} gRPC requests in flight, its limit; "
                                  "retry shortly")

    async def _info(self, model: str | None) -> Message:
        name = self._model(model, tuple(MODEL_TYPES), "Info")
        config = self._configs[name]
        return tei_pb2.InfoResponse(
            version=VERSION, model_id=name, model_dtype=(await self._model_info(name))["dtype"],
            model_type=MODEL_TYPES[config.kind], max_concurrent_requests=self._limits.max_requests_in_flight,
            max_input_length=config.max_length or 0, max_batch_tokens=config.max_batch_tokens or 0,
            max_client_batch_size=self._limits.max_inputs_per_request)

    async def _embed(self, request: Message, model: str | None) -> Message:
        body = parse_request(EmbedRequest, inputs=request.inputs, model=model, truncate=request.truncate,
                             normalize=_optional(request, "normalize"),
                             truncation_direction=_direction(request.truncation_direction),
                             prompt_name=_optional(request, "prompt_name"),
                             dimensions=_optional(request, "dimensions"))
        vectors, counts = await self.embed_request(body, "grpc")
        metadata = tei_pb2.Metadata(compute_chars=len(request.inputs), compute_tokens=int(counts.sum()))
        return tei_pb2.EmbedResponse(embeddings=vectors[0].tolist(), metadata=metadata)

    async def _rerank(self, request: Message, model: str | None) -> Message:
        body = parse_request(RerankRequest, query=request.query, texts=list(request.texts), model=model,
                             truncate=request.truncate, raw_scores=request.raw_scores,
                             return_text=request.return_text,
                             truncation_direction=_direction(request.truncation_direction))
        _, ranked, tokens = await self.rerank_request(body, "grpc", raw_scores=body.raw_scores)
        ranks = [tei_pb2.Rank(index=r.index, score=r.score, text=body.texts[r.index] if body.return_text else None)
                 for r in ranked]
        chars = len(body.query) + sum(len(text) for text in body.texts)
        metadata = tei_pb2.Metadata(compute_chars=chars, compute_tokens=tokens)
        return tei_pb2.RerankResponse(ranks=ranks, metadata=metadata)
