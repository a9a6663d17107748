"""The HTTP ingress: the FastAPI routes (``@serve.ingress``) over the ``EmbeddingPipeline``.

Errors and their JSON are ``deployments.http_errors``, the checks before a body
is read ``deployments.guard``, request validation ``deployments.validation``,
the way a request takes through the cluster ``deployments.pipeline``. Embedding
routes answer with TEI's timing headers (``x-total-time``, ``x-tokenization-time``,
``x-queue-time``, ``x-inference-time``, in milliseconds) and Serve's proxy adds
``X-Request-Id`` (the client's, or a new one) to every answer.

No ``from __future__ import annotations`` here: FastAPI reads the routes' body types at runtime.
"""

import base64
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.guard import RequestGuard
from deployments.http_errors import JSONBytesResponse, error_body, install_error_handlers
from deployments.pipeline import EmbeddingPipeline, collect_timings, stop_timings
from deployments.schema import (
    EmbedChunksRequest,
    EmbedChunksResponse,
    EmbedRequest,
    EmbedResponse,
    EmbedTokensRequest,
    EmbedTokensResponse,
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelsResponse,
    OpenAIEmbeddingRequest,
    OpenAIEmbeddingResponse,
    ReadyResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from deployments.settings import ServingSettings

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
    """Add TEI's timing headers to an embedding route's answer."""

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
        return response

    return answer


@serve.deployment(name="ingress")
@serve.ingress(app)
class Ingress(EmbeddingPipeline):
    """The routes; the Python client calls the pipeline's methods through the app's handle."""

    def __init__(self, settings: ServingSettings, tokenizer: DeploymentHandle,
                 encoders: dict[str, DeploymentHandle]) -> None:
        super().__init__(settings, tokenizer, encoders)
        app.state.serving = settings

    @app.post("/v1/embeddings", response_model=OpenAIEmbeddingResponse, tags=["OpenAI"])
    @timed
    async def openai_embeddings(self, body: OpenAIEmbeddingRequest) -> Response:
        """OpenAI's embeddings API: works unchanged with the official ``openai`` client."""
        name = self._model(body.model)
        given_ids = isinstance(body.input, list) and bool(body.input) and not isinstance(body.input[0], str)
        vectors, counts = await self.pooled_vectors(
            name, texts=None if given_ids else body.input, token_ids=body.input if given_ids else None,
            dimensions=body.dimensions, prompt_name=body.prompt_name, prompt=body.prompt, route="openai")
        if body.encoding_format == "base64":
            encoded = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
        else:
            encoded = list(vectors)
        tokens = int(counts.sum())
        return JSONBytesResponse({
            "object": "list",
            "data": [{"object": "embedding", "embedding": e, "index": i} for i, e in enumerate(encoded)],
            "model": name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        })

    @app.post("/embed", response_model=EmbedResponse, tags=["native"])
    @timed
    async def embed(self, body: EmbedRequest) -> Response:
        """One pooled vector per input text."""
        vectors, _ = await self.embed_request(body, "embed")
        return JSONBytesResponse(vectors)

    @app.post("/", response_model=EmbedResponse, tags=["TEI"])
    @timed
    async def model_task(self, body: EmbedRequest) -> Response:
        """TEI's root route: the model's task (``/embed`` for an embedding model), as
        ``huggingface_hub.InferenceClient(base_url=...).feature_extraction`` calls it."""
        vectors, _ = await self.embed_request(body, "root")
        return JSONBytesResponse(vectors)

    @app.post("/invocations", response_model=EmbedResponse, tags=["TEI"])
    @timed
    async def invocations(self, body: EmbedRequest) -> Response:
        """SageMaker's route, as TEI serves it: the same as ``POST /``."""
        vectors, _ = await self.embed_request(body, "invocations")
        return JSONBytesResponse(vectors)

    @app.post("/embed_tokens", response_model=EmbedTokensResponse, tags=["native"])
    @timed
    async def embed_tokens(self, body: EmbedTokensRequest) -> Response:
        """One vector per wordpiece (or per word, from pre-split words), with the tokens."""
        vectors, tokens = await self.token_vectors_request(body, "embed_tokens")
        return JSONBytesResponse([{"tokens": t, "embeddings": v} for t, v in zip(tokens, vectors)])

    @app.post("/embed_chunks", response_model=EmbedChunksResponse, tags=["native"])
    @timed
    async def embed_chunks(self, body: EmbedChunksRequest) -> Response:
        """Chunk vectors with character offsets: late chunking (each chunk pooled from its whole
        document's encoding), or each chunk embedded alone (``context: "chunk"``)."""
        name = self._model(body.model)
        tables, vectors, tokens = await self.chunks_request(body.model_copy(update={"model": name}), "embed_chunks")
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        data = [{"index": index, "chunks": [
            {"start": int(start), "end": int(end), "text": text[start:end], "num_tokens": int(count),
             "embedding": vector} for (start, end, count), vector in zip(table.tolist(), document_vectors)]}
            for index, (text, table, document_vectors) in enumerate(zip(texts, tables, vectors))]
        return JSONBytesResponse({"object": "list", "model": name, "data": data,
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @app.post("/tokenize", response_model=TokenizeResponse, tags=["native"])
    async def tokenize(self, body: TokenizeRequest) -> Response:
        """The wordpieces the encoder sees for each input, and how many segments it folds into."""
        return JSONBytesResponse(await self.tokenize_request(body))

    @app.get("/models", response_model=ModelsResponse, tags=["native"])
    async def models(self) -> Response:
        """Served models: dimension, dtype, device, max_length, pooling, normalization, prompts, replicas."""
        cards = [ModelCard(**card).model_dump() for card in await self.list_models()]
        return JSONBytesResponse({"object": "list", "data": cards})

    @app.get("/v1/models", response_model=ModelsResponse, tags=["OpenAI"])
    async def openai_models(self) -> Response:
        """OpenAI's model list (``client.models.list()``): the same cards as ``GET /models``."""
        return await self.models()

    @app.get("/health", response_model=HealthResponse, tags=["native"])
    async def health(self) -> Response:
        """Liveness: the ingress is up (no API key needed)."""
        return JSONBytesResponse({"status": "ok", "models": sorted(self._encoders)})

    @app.get("/ready", response_model=ReadyResponse, tags=["native"])
    async def ready(self) -> Response:
        """Readiness: 200 once every model has a running replica (which has answered a forward pass),
        else 503 naming the models that are not ready and why (no API key needed)."""
        waiting = await self.not_ready()
        if waiting:
            return error_body("not ready: " + "; ".join(f"{m} ({why})" for m, why in waiting.items()),
                              "not_ready", 503)
        return JSONBytesResponse({"status": "ready", "models": sorted(self._encoders)})
