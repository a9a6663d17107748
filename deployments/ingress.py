"""The HTTP ingress: the embedding routes here, the scoring routes (``deployments.rerank_routes``),
over the ``ScoringPipeline`` (``@serve.ingress``).

Errors and their JSON are ``deployments.http_errors``, the checks before a body
is read ``deployments.guard``, request validation ``deployments.validation``,
the way a request takes through the cluster ``deployments.pipeline``. Embedding
routes answer with TEI's timing headers (``x-total-time``, ``x-tokenization-time``,
``x-queue-time``, ``x-inference-time``, in milliseconds) and Serve's proxy adds
``X-Request-Id`` (the client's, or a new one) to every answer.

No ``from __future__ import annotations`` here: FastAPI reads the routes' body types at runtime.
"""

import base64

from fastapi.responses import Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.grpc_service import TEIServices
from deployments.http_app import app, timed
from deployments.http_errors import JSONBytesResponse, error_body
from deployments.rerank_routes import cohere_rerank, tei_predict, tei_rerank
from deployments.rerank_schema import (
    CohereRerankRequest,
    CohereRerankResponse,
    Prediction,
    PredictRequest,
    RankedText,
    RerankRequest,
)
from deployments.sparse_pipeline import SparsePipeline
from deployments.sparse_schema import EmbedSparseRequest, SparseValue
from deployments.schema import (
    EmbedChunksRequest,
    EmbedChunksResponse,
    EmbedRequest,
    EmbedResponse,
    EmbedTokensRequest,
    EmbedTokensResponse,
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

@serve.deployment(name="ingress")
@serve.ingress(app)
class Ingress(TEIServices, SparsePipeline):
    """The routes; the Python client calls the pipeline's methods through the app's handle."""

    def __init__(self, settings: ServingSettings, tokenizer: DeploymentHandle,
                 encoders: dict[str, DeploymentHandle]) -> None:
        super().__init__(settings, tokenizer, encoders)
        app.state.serving = settings

    @app.post("/v1/embeddings", response_model=OpenAIEmbeddingResponse, tags=["OpenAI"])
    @timed
    async def openai_embeddings(self, body: OpenAIEmbeddingRequest) -> Response:
        """OpenAI's embeddings API: works unchanged with the official ``openai`` client. The extra field
        ``precision`` (``extra_body``) quantizes as on ``/embed``; with ``encoding_format: base64`` the
        quantized bytes are base64'd (the openai client decodes base64 as float32 only when it chose
        base64 itself: ask for ``float`` or ``base64`` explicitly with a quantized precision)."""
        name = self._model(body.model)
        given_ids = isinstance(body.input, list) and bool(body.input) and not isinstance(body.input[0], str)
        vectors, counts = await self.pooled_vectors(
            name, texts=None if given_ids else body.input, token_ids=body.input if given_ids else None,
            dimensions=body.dimensions, prompt_name=body.prompt_name, prompt=body.prompt, precision=body.precision,
            route="openai")
        if body.encoding_format == "base64":  # float32 little-endian, or the quantized bytes as they are
            packed = vectors.astype("<f4") if body.precision == "float32" else vectors
            encoded = [base64.b64encode(v.tobytes()).decode("ascii") for v in packed]
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

    @app.post("/rerank", response_model=list[RankedText], tags=["TEI"])
    @timed
    async def rerank(self, body: RerankRequest) -> Response:
        """Every text scored against the query, best first (TEI's schema). A reranker reads a long
        text in windows beside the whole query and scores it by its best (``aggregate``); ``window``
        gives the characters that scored. An embedding model scores by cosine."""
        return await tei_rerank(self, body)

    @app.post("/v1/rerank", response_model=CohereRerankResponse, tags=["Cohere"])
    @timed
    async def rerank_v1(self, body: CohereRerankRequest) -> Response:
        """Cohere's and Jina's rerank API: the ``top_n`` best documents."""
        return await cohere_rerank(self, body, "v1_rerank")

    @app.post("/v2/rerank", response_model=CohereRerankResponse, tags=["Cohere"])
    @timed
    async def rerank_v2(self, body: CohereRerankRequest) -> Response:
        """Cohere's v2 rerank API, as ``cohere.ClientV2(base_url=...).rerank`` calls it."""
        return await cohere_rerank(self, body, "v2_rerank")

    @app.post("/predict", response_model=list[Prediction] | list[list[Prediction]], tags=["TEI"])
    @timed
    async def predict(self, body: PredictRequest) -> Response:
        """Each label's score, best first (TEI's schema): the folder's activation, else a softmax over
        several labels (a sigmoid for one); ``raw_scores`` gives the logits."""
        return await tei_predict(self, body)

    @app.post("/embed_sparse", response_model=list[list[SparseValue]], tags=["TEI"])
    @timed
    async def embed_sparse(self, body: EmbedSparseRequest) -> Response:
        """Each text's sparse (SPLADE) vector, its non-zero dimensions only (TEI's schema), with each
        dimension's token on ``return_tokens``."""
        _, result = await self.sparse_request(body, "embed_sparse")
        answers = []
        for number, (indices, values) in enumerate(result.rows):
            tokens = result.tokens[number] if result.tokens is not None else None
            answers.append([{"index": int(index), "value": float(value), **({"token": tokens[k]} if tokens else {})}
                            for k, (index, value) in enumerate(zip(indices.tolist(), values.tolist()))])
        return JSONBytesResponse(answers)

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
