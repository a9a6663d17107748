"""The HTTP ingress (FastAPI through ``@serve.ingress``) and the handle API behind it.

Each request is validated here, tokenized by the tokenizer deployment and
encoded by its model's encoder deployment: the tokenizer's response is passed
straight into the encoder call, so the folded batch travels tokenizer ->
encoder through the object store, never through this replica. Small requests
(``inline_tokenize_max_chars``) are tokenized here instead: a Serve hop costs
more than tokenizing a few sentences.
"""


import asyncio
import base64
import hmac
import logging
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException
from ray.serve.handle import DeploymentHandle, DeploymentResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.errors import (
    BadRequestError,
    EmbeddingRequestError,
    OverloadedError,
    PayloadTooLargeError,
    ReplicaFailedError,
    UnauthorizedError,
    UnknownModelError,
)
from deployments.metrics import IngressMetrics
from deployments.protocol import ChunkRequest, EncodeOptions, EncodeResult, FoldRequest
from deployments.schema import (
    CHUNK_CONTEXTS,
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
    TokenizeRequest,
    TokenizeResponse,
)
from deployments.settings import ServingSettings
from deployments.tokenizer import RequestFolder
from embedder.folded_batch import FoldedBatch
from embedder.folding import unfold_index
from embedder.chunking import DEFAULT_CHUNK_SIZE, check_chunking
from embedder.indexer import TRUNCATION_DIRECTIONS
from embedder.sentence_pooling import check_pooling_modes

logger = logging.getLogger(__name__)

RETRY_AFTER_S = "1"
REPLICA_DEATHS = (RayActorError, ActorUnavailableError)
ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 422, 503)}


class JSONBytesResponse(Response):
    """JSON through orjson, numpy arrays included (far faster than lists of Python floats)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def error_body(message: str, error_type: str, code: int) -> Response:
    """The JSON of every error: ``{"error": {"message", "type", "code", "param"}}``."""
    headers = {"Retry-After": RETRY_AFTER_S} if code == 503 else None
    body = {"error": {"message": message, "type": error_type, "code": code, "param": None}}
    return JSONBytesResponse(body, status_code=code, headers=headers)


def error_response(error: EmbeddingRequestError) -> Response:
    return error_body(error.message, error.error_type, error.status_code)


def cause_of(error: BaseException) -> BaseException:
    """The exception a replica raised, without Ray's wrapping (and its traceback text)."""
    while isinstance(error, RayTaskError) and error.cause is not None and error.cause is not error:
        error = error.cause
    return error


def as_request_error(error: BaseException) -> EmbeddingRequestError | None:
    """Map what a deployment call raised to the client's error, or ``None`` for a server fault."""
    error = cause_of(error)
    if isinstance(error, EmbeddingRequestError):
        return type(error)(error.message)
    if isinstance(error, (BackPressureError, DeploymentUnavailableError)):
        return OverloadedError("the cluster is at capacity; retry shortly")
    if isinstance(error, RayServeException) and isinstance(error.__cause__, REPLICA_DEATHS):
        error = error.__cause__  # the tokenizer replica died before the encoder call could start
    if isinstance(error, REPLICA_DEATHS):
        return ReplicaFailedError("a replica failed while answering and is being replaced; retry shortly")
    return None


app = FastAPI(
    title="embedding-cluster",
    description="Transformer embeddings with AllenNLP's embedder semantics, served by Ray Serve.",
    version="0.1.0",
    responses=ERROR_RESPONSES,
)


@app.exception_handler(EmbeddingRequestError)
async def _request_error(_: Request, error: EmbeddingRequestError) -> Response:
    return error_response(error)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, error: RequestValidationError) -> Response:
    problems = error.errors()
    if any(p.get("type") == "json_invalid" for p in problems):
        return error_response(BadRequestError("malformed JSON body"))
    parts = []
    for problem in problems[:5]:
        location = ".".join(str(x) for x in problem.get("loc", ()) if x != "body")
        parts.append(f"{location or 'body'}: {problem.get('msg', 'invalid')}")
    return error_body("; ".join(parts), "invalid_request_error", 422)


@app.exception_handler(Exception)
async def _server_error(_: Request, error: Exception) -> Response:
    logger.error("request failed: %s", type(cause_of(error)).__name__)
    return error_body("internal error; it has been logged", "server_error", 500)


class RequestGuard:
    """Runs before a body is read: 401 without the API key (every route but ``/health``),
    503 past ``max_requests_in_flight`` (shedding load costs this replica next to nothing,
    so refusals stay fast while it is saturated), 413 for a body over the limit (at once
    when Content-Length says so, else as soon as a streamed body passes it). The replica
    puts its settings in ``app.state.serving``."""

    def __init__(self, app: Callable) -> None:
        self.app = app
        self.in_flight = 0

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        settings: ServingSettings | None = getattr(scope["app"].state, "serving", None) if "app" in scope else None
        if scope["type"] != "http" or settings is None:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        if path == "/health":
            return await self.app(scope, receive, send)
        if settings.api_key is not None and not _has_key(headers, settings.api_key):
            error = UnauthorizedError("missing or wrong API key (send 'Authorization: Bearer <key>')")
            return await error_response(error)(scope, receive, send)
        if self.in_flight >= settings.limits.max_requests_in_flight:
            error = OverloadedError(f"this ingress has {self.in_flight} requests in flight, its limit; retry shortly")
            return await error_response(error)(scope, receive, send)
        self.in_flight += 1
        try:
            await self._within_body_limit(scope, receive, send, headers, settings.limits.max_body_bytes)
        finally:
            self.in_flight -= 1

    async def _within_body_limit(self, scope: dict, receive: Callable, send: Callable, headers: dict,
                                 limit: int) -> None:
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return await error_response(_too_large(int(length), limit))(scope, receive, send)
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


def _has_key(headers: dict[bytes, bytes], key: str) -> bool:
    """``Authorization: Bearer <key>`` (what the openai client sends) or ``X-API-Key``, compared in constant time."""
    given = headers.get(b"authorization", b"")
    token = given[7:] if given[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
    return hmac.compare_digest(token, key.encode())


def _too_large(size: int, limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"the body has {size} bytes or more, over the limit of {limit}")


app.add_middleware(RequestGuard)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, error: StarletteHTTPException) -> Response:
    error_type = PayloadTooLargeError.error_type if error.status_code == 413 else "http_error"
    response = error_body(str(error.detail), error_type, error.status_code)
    response.headers.update(error.headers or {})
    return response


def _check_texts(value: Any, limits, name: str = "input") -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise BadRequestError(f"'{name}' must be a string or a list of strings, not {type(value).__name__}")
    if not value:
        raise BadRequestError(f"'{name}' is an empty list")
    if len(value) > limits.max_inputs_per_request:
        raise PayloadTooLargeError(f"{len(value)} inputs in one request, over the limit of "
                                   f"{limits.max_inputs_per_request}")
    for index, text in enumerate(value):
        if not isinstance(text, str):
            raise BadRequestError(f"{name}[{index}] is {type(text).__name__}, expected a string")
        if not text.strip():
            raise BadRequestError(f"{name}[{index}] is empty or whitespace only")
        if len(text) > limits.max_chars_per_input:
            raise PayloadTooLargeError(f"{name}[{index}] has {len(text)} characters, over the limit of "
                                       f"{limits.max_chars_per_input}")
    return list(value)


def _check_words(value: Any, limits) -> list[list[str]]:
    if not isinstance(value, (list, tuple)) or not value:
        raise BadRequestError("'words' must be a non-empty list of lists of strings")
    if len(value) > limits.max_inputs_per_request:
        raise PayloadTooLargeError(f"{len(value)} inputs in one request, over the limit of "
                                   f"{limits.max_inputs_per_request}")
    for index, words in enumerate(value):
        if not isinstance(words, (list, tuple)) or not words:
            raise BadRequestError(f"words[{index}] must be a non-empty list of strings")
        if not all(isinstance(w, str) for w in words):
            raise BadRequestError(f"words[{index}] holds something that is not a string")
        if sum(len(w) for w in words) > limits.max_chars_per_input:
            raise PayloadTooLargeError(f"words[{index}] has more than {limits.max_chars_per_input} characters")
    return [list(words) for words in value]


def _check_pairs(value: Any, limits) -> list[tuple[str, str]]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        raise BadRequestError("'pairs' must be a list of [text, text] pairs")
    firsts = _check_texts([p[0] for p in value], limits, "pairs")
    seconds = _check_texts([p[1] for p in value], limits, "pairs")
    return list(zip(firsts, seconds))


def _check_direction(value: Any) -> str | None:
    if value is not None and value not in TRUNCATION_DIRECTIONS:
        raise BadRequestError(f"truncation_direction must be one of {TRUNCATION_DIRECTIONS}, not {value!r}")
    return value


def _check_pooling(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, (str, list, tuple)):
        raise BadRequestError(f"pooling must be a mode or a list of modes, not {type(value).__name__}")
    try:
        return check_pooling_modes(value)
    except ValueError as error:
        raise BadRequestError(str(error)) from None


def _check_spans(value: Any, count: int) -> list[list[tuple[int, int]]]:
    """Per document, a non-empty list of ``[start, end)`` integer pairs (their range is checked
    against the text when it is tokenized)."""
    if not isinstance(value, (list, tuple)) or len(value) != count:
        raise BadRequestError(f"'spans' must hold one list of [start, end) spans per document ({count})")
    checked = []
    for index, document in enumerate(value):
        if not isinstance(document, (list, tuple)) or not document:
            raise BadRequestError(f"spans[{index}] must be a non-empty list of [start, end) spans")
        for number, span in enumerate(document):
            if not (isinstance(span, (list, tuple)) and len(span) == 2
                    and all(isinstance(x, int) and not isinstance(x, bool) for x in span)):
                raise BadRequestError(f"spans[{index}][{number}] must be a pair of integers [start, end), "
                                      f"not {span!r}")
        checked.append([tuple(span) for span in document])
    return checked


def _truncate_dimensions(vectors: np.ndarray, dimensions: int | None, renormalize: bool) -> np.ndarray:
    if dimensions is None:
        return vectors
    if dimensions > vectors.shape[1]:
        raise BadRequestError(f"dimensions={dimensions} is more than the model's {vectors.shape[1]}")
    vectors = vectors[:, :dimensions]
    if renormalize:
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(vectors, dtype=np.float32)


def deployment_name(model: str) -> str:
    """The encoder deployment's name for a served model."""
    return "encoder-" + re.sub(r"[^A-Za-z0-9_.-]", "-", model)


@serve.deployment(name="ingress")
@serve.ingress(app)
class Ingress:
    """Routes, validation and errors; the Python client calls the ``embed_*`` methods
    through the app's handle, HTTP clients the FastAPI routes."""

    def __init__(self, settings: ServingSettings, tokenizer: DeploymentHandle,
                 encoders: dict[str, DeploymentHandle]) -> None:
        self._settings = settings
        self._limits = settings.limits
        self._tokenizer = tokenizer
        self._folder = (RequestFolder(settings.models, settings.limits)
                        if settings.ingress.inline_tokenize_max_chars else None)
        self._encoders = encoders
        self._configs = {model.name: model for model in settings.models}
        self._default_model = settings.models[0].name
        self._infos: dict[str, dict] = {}
        self._metrics = IngressMetrics()
        app.state.serving = settings

    # --- the pipeline -------------------------------------------------------

    def _model(self, model: str | None) -> str:
        name = model or self._default_model
        if name not in self._encoders:
            raise UnknownModelError(f"no model named {name!r}; served: {sorted(self._encoders)}")
        return name

    async def _run(self, call: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await call()
        except EmbeddingRequestError:
            raise
        except Exception as error:
            mapped = as_request_error(error)
            if mapped is None:
                logger.error("deployment call failed: %s", type(cause_of(error)).__name__)
                raise
            raise mapped from None

    def _tokenizes_here(self, fold: FoldRequest) -> bool:
        return self._folder is not None and fold.num_chars <= self._settings.ingress.inline_tokenize_max_chars

    def _fold(self, fold: FoldRequest) -> FoldedBatch | DeploymentResponse:
        """The folded batch (small requests), or the tokenizer deployment's response to pass on."""
        return self._folder.fold(fold) if self._tokenizes_here(fold) else self._tokenizer.fold.remote(fold)

    async def _folded(self, fold: FoldRequest) -> FoldedBatch:
        """The folded batch itself, here (small requests) or from the tokenizer deployment."""
        if self._tokenizes_here(fold):
            return self._folder.fold(fold)
        return await self._retrying(lambda: self._tokenizer.fold.remote(fold))

    async def _retrying(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """``_run``, once more when a replica died mid-call: embedding calls are idempotent,
        and Serve routes the second try to a live replica."""
        try:
            return await self._run(call)
        except ReplicaFailedError:
            logger.warning("a replica failed mid-request; retrying once")
            return await self._run(call)

    async def _encode(self, fold: FoldRequest, options: EncodeOptions, route: str) -> EncodeResult:
        started = time.monotonic()
        tags = {"model": fold.model, "route": route}
        status = "error"
        try:
            result: EncodeResult = await self._retrying(
                lambda: self._encoders[fold.model].encode.remote(self._fold(fold), options))
            status = "ok"
        except EmbeddingRequestError as error:
            status = str(error.status_code)
            raise
        finally:
            self._metrics.requests.inc(tags=tags | {"status": status})
        self._metrics.inputs.inc(len(result.num_wordpieces), tags=tags)
        self._metrics.wordpieces.inc(int(result.num_wordpieces.sum()), tags=tags)
        self._metrics.latency.observe(1000 * (time.monotonic() - started), tags=tags)
        return result

    def _texts_or_words(self, model: str, texts: Any, words: Any, truncate: bool, truncation_direction: Any,
                        prompt_name: Any, prompt: Any, return_wordpieces: bool) -> FoldRequest:
        if (texts is None) == (words is None):
            raise BadRequestError("give exactly one of texts or words")
        return FoldRequest(model=model, texts=None if texts is None else _check_texts(texts, self._limits),
                           words=None if words is None else _check_words(words, self._limits),
                           truncate=truncate, truncation_direction=_check_direction(truncation_direction),
                           prompt=self._prompt(model, prompt_name, prompt), return_wordpieces=return_wordpieces)

    def _prompt(self, model: str, prompt_name: Any, prompt: Any) -> str | None:
        """The prompt text a request asks for (the model's default prompt when it names none)."""
        if prompt_name is not None and not isinstance(prompt_name, str):
            raise BadRequestError(f"prompt_name must be a string, not {type(prompt_name).__name__}")
        if prompt is not None and not isinstance(prompt, str):
            raise BadRequestError(f"prompt must be a string, not {type(prompt).__name__}")
        try:
            return self._configs[model].prompt(prompt_name, prompt)
        except ValueError as error:
            raise BadRequestError(f"model {model!r}: {error}") from None

    async def _model_info(self, name: str) -> dict:
        if name not in self._infos:
            self._infos[name] = await self._run(lambda: self._encoders[name].info.remote())
        return self._infos[name]

    # --- handle API (cluster.EmbeddingClient) --------------------------------

    async def embed_texts(self, texts: Any = None, model: str | None = None, pooling: Any = None,
                          normalize: bool | None = None, truncate: bool = False, dimensions: int | None = None,
                          pairs: Any = None, prompt_name: str | None = None, prompt: str | None = None,
                          truncation_direction: str | None = None,
                          route: str = "handle") -> tuple[np.ndarray, np.ndarray]:
        """Pooled vectors ``[n, dim]`` (one per text, or per pair) and each input's wordpiece count."""
        name = self._model(model)
        if (texts is None) == (pairs is None):
            raise BadRequestError("give exactly one of texts or pairs")
        fold = FoldRequest(model=name, truncate=truncate, truncation_direction=_check_direction(truncation_direction),
                           prompt=self._prompt(name, prompt_name, prompt),
                           texts=None if texts is None else _check_texts(texts, self._limits),
                           pairs=None if pairs is None else _check_pairs(pairs, self._limits))
        options = EncodeOptions(level="pooled", pooling=_check_pooling(pooling), normalize=normalize)
        result = await self._encode(fold, options, route)
        if dimensions is not None:
            info = await self._model_info(name)
            renormalize = info["normalize"] if normalize is None else normalize
            return _truncate_dimensions(result.vectors, dimensions, renormalize), result.num_wordpieces
        return result.vectors, result.num_wordpieces

    async def embed_token_vectors(self, texts: Any = None, words: Any = None, model: str | None = None,
                                  level: str = "wordpiece", sub_token_mode: str = "avg", truncate: bool = False,
                                  prompt_name: str | None = None, prompt: str | None = None,
                                  truncation_direction: str | None = None,
                                  route: str = "handle") -> tuple[list[np.ndarray], list[list[str]]]:
        """Per input: ``[tokens, dim]`` vectors and the tokens (wordpieces, or the words)."""
        name = self._model(model)
        if level not in ("wordpiece", "word"):
            raise BadRequestError(f"level must be 'wordpiece' or 'word', not {level!r}")
        if sub_token_mode not in ("avg", "first", "last"):
            raise BadRequestError(f"sub_token_mode must be avg, first or last, not {sub_token_mode!r}")
        if level == "word" and words is None:
            raise BadRequestError("level 'word' needs pre-split words")
        fold = self._texts_or_words(name, texts, words, truncate, truncation_direction, prompt_name, prompt,
                                    return_wordpieces=level == "wordpiece")
        result = await self._encode(fold, EncodeOptions(level=level, sub_token_mode=sub_token_mode), route)
        tokens = result.wordpieces if level == "wordpiece" else fold.words
        return result.vectors, tokens

    async def tokenize_inputs(self, texts: Any = None, words: Any = None, model: str | None = None,
                              truncate: bool = False, prompt_name: str | None = None, prompt: str | None = None,
                              truncation_direction: str | None = None) -> list[dict]:
        """The wordpieces, ids and segments of each input, as the encoder would see them."""
        name = self._model(model)
        fold = self._texts_or_words(name, texts, words, truncate, truncation_direction, prompt_name, prompt,
                                    return_wordpieces=True)
        batch = await self._folded(fold)
        ids = np.split(batch.token_ids[unfold_index(batch)], np.cumsum(batch.num_wordpieces)[:-1])
        entries = []
        for index in range(batch.num_inputs):
            entry = {"tokens": batch.wordpieces[index], "ids": ids[index].tolist(),
                     "num_segments": int(batch.segments_per_input[index]), "word_offsets": None,
                     "prompt_length": None if batch.prompt_lengths is None else int(batch.prompt_lengths[index])}
            if batch.has_words:
                entry["word_offsets"] = [tuple(o) for o in batch.input_offsets(index).tolist()]
            entries.append(entry)
        return entries

    async def embed_document_chunks(self, texts: Any = None, model: str | None = None,
                                    chunk_size: Any = DEFAULT_CHUNK_SIZE, chunk_overlap: Any = 0, spans: Any = None,
                                    context: str = "document", pooling: Any = None, normalize: bool | None = None,
                                    dimensions: int | None = None, prompt_name: str | None = None,
                                    prompt: str | None = None,
                                    route: str = "handle") -> tuple[list[np.ndarray], list[np.ndarray], int]:
        """Per document: its chunks ``[n, 3]`` (start and end characters, wordpieces) and their vectors
        ``[n, dim]``; and the wordpieces embedded. ``context="document"`` pools each chunk from the whole
        document's encoding (late chunking); ``"chunk"`` embeds each chunk's text alone."""
        name = self._model(model)
        texts = _check_texts(texts, self._limits)
        if context not in CHUNK_CONTEXTS:
            raise BadRequestError(f"context must be one of {CHUNK_CONTEXTS}, not {context!r}")
        if spans is None:
            try:
                check_chunking(chunk_size, chunk_overlap)
            except ValueError as error:
                raise BadRequestError(str(error)) from None
        else:
            spans = _check_spans(spans, len(texts))
        chunking = ChunkRequest(chunk_size=chunk_size, chunk_overlap=chunk_overlap, spans=spans)
        prompt_text = self._prompt(name, prompt_name, prompt)
        modes = _check_pooling(pooling)
        if context == "document":
            model_modes = check_pooling_modes(self._configs[name].pooling or "mean")
            if (modes or model_modes) != ("mean",):
                raise BadRequestError(
                    f"late chunking averages each chunk's wordpieces, but model {name!r} pools with "
                    f"{'+'.join(modes or model_modes)}; send \"pooling\": \"mean\" to chunk it anyway, or "
                    f"\"context\": \"chunk\" to embed each chunk alone")
            fold = FoldRequest(model=name, texts=texts, prompt=prompt_text, chunks=chunking)
            result = await self._encode(fold, EncodeOptions(level="chunk", normalize=normalize), route)
            tables, vectors = result.chunks, list(result.vectors)
        else:
            plan = (await self._folded(FoldRequest(model=name, texts=texts, chunks=chunking))).chunk_table()
            pieces = [text[start:end] for text, table in zip(texts, plan) for start, end, _ in table]
            fold = FoldRequest(model=name, texts=pieces, prompt=prompt_text)
            result = await self._encode(fold, EncodeOptions(level="pooled", pooling=modes, normalize=normalize), route)
            bounds = np.cumsum([len(table) for table in plan])[:-1]
            vectors = np.split(result.vectors, bounds)
            tables = [np.column_stack([table[:, :2], counts])
                      for table, counts in zip(plan, np.split(result.num_wordpieces, bounds))]
        if dimensions is not None:
            info = await self._model_info(name)
            renormalize = info["normalize"] if normalize is None else normalize
            vectors = [_truncate_dimensions(v, dimensions, renormalize) for v in vectors]
        return tables, vectors, int(result.num_wordpieces.sum())

    async def list_models(self) -> list[dict]:
        """Every served model with its settings and its replica counts by state (running, starting, ...)."""
        replicas = await asyncio.to_thread(self._replica_counts)
        cards = []
        for config in self._settings.models:
            info = await self._model_info(config.name)
            cards.append({"id": config.name, **info, "replicas": replicas.get(config.name, {})})
        return cards

    def _replica_counts(self) -> dict[str, dict[str, int]]:
        """Per model: replicas by state, and ``target`` (the autoscaler's decision), from the
        controller's instance details (what Serve's dashboard API shows; ``serve.status()``
        has no target)."""
        try:
            details = serve.context._get_global_client().get_serve_details()
        except Exception:  # the controller is unreachable: leave the counts out
            logger.warning("no replica counts: the Serve controller did not answer")
            return {}
        application = details.get("applications", {}).get(serve.get_replica_context().app_name, {})
        deployments = application.get("deployments", {})
        counts = {}
        for config in self._settings.models:
            deployment = deployments.get(deployment_name(config.name))
            if deployment is not None:
                states = Counter(str(getattr(replica["state"], "value", replica["state"])).lower()
                                 for replica in deployment["replicas"])
                counts[config.name] = {**states, "target": int(deployment["target_num_replicas"])}
        return counts

    # --- HTTP routes ----------------------------------------------------------

    @app.post("/v1/embeddings", response_model=OpenAIEmbeddingResponse, tags=["OpenAI"])
    async def openai_embeddings(self, body: OpenAIEmbeddingRequest) -> Response:
        """OpenAI's embeddings API: works unchanged with the official ``openai`` client."""
        if isinstance(body.input, list) and body.input and not isinstance(body.input[0], str):
            raise BadRequestError("token-id arrays are not supported as input; send text")
        name = self._model(body.model)
        vectors, counts = await self.embed_texts(body.input, model=name, dimensions=body.dimensions,
                                                 prompt_name=body.prompt_name, prompt=body.prompt, route="openai")
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
    async def embed(self, body: EmbedRequest) -> Response:
        """One pooled vector per input text."""
        vectors, _ = await self.embed_texts(body.inputs, pairs=body.pairs, model=body.model, pooling=body.pooling,
                                            normalize=body.normalize, truncate=body.truncate,
                                            truncation_direction=body.truncation_direction,
                                            dimensions=body.dimensions, prompt_name=body.prompt_name,
                                            prompt=body.prompt, route="embed")
        return JSONBytesResponse(vectors)

    @app.post("/embed_tokens", response_model=EmbedTokensResponse, tags=["native"])
    async def embed_tokens(self, body: EmbedTokensRequest) -> Response:
        """One vector per wordpiece (or per word, from pre-split words), with the tokens."""
        vectors, tokens = await self.embed_token_vectors(
            texts=body.inputs, words=body.words, model=body.model, level=body.level,
            sub_token_mode=body.sub_token_mode, truncate=body.truncate, prompt_name=body.prompt_name,
            prompt=body.prompt, truncation_direction=body.truncation_direction, route="embed_tokens")
        return JSONBytesResponse([{"tokens": t, "embeddings": v} for t, v in zip(tokens, vectors)])

    @app.post("/tokenize", response_model=TokenizeResponse, tags=["native"])
    async def tokenize(self, body: TokenizeRequest) -> Response:
        """The wordpieces the encoder sees for each input, and how many segments it folds into."""
        return JSONBytesResponse(await self.tokenize_inputs(
            texts=body.inputs, words=body.words, model=body.model, truncate=body.truncate,
            prompt_name=body.prompt_name, prompt=body.prompt, truncation_direction=body.truncation_direction))

    @app.post("/embed_chunks", response_model=EmbedChunksResponse, tags=["native"])
    async def embed_chunks(self, body: EmbedChunksRequest) -> Response:
        """Chunk vectors with character offsets: late chunking (each chunk pooled from its whole
        document's encoding), or each chunk embedded alone (``context: "chunk"``)."""
        name = self._model(body.model)
        tables, vectors, tokens = await self.embed_document_chunks(
            body.inputs, model=name, chunk_size=body.chunk_size, chunk_overlap=body.chunk_overlap,
            spans=body.spans, context=body.context, pooling=body.pooling, normalize=body.normalize,
            dimensions=body.dimensions, prompt_name=body.prompt_name, prompt=body.prompt, route="embed_chunks")
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        data = [{"index": index, "chunks": [
            {"start": int(start), "end": int(end), "text": text[start:end], "num_tokens": int(count),
             "embedding": vector} for (start, end, count), vector in zip(table.tolist(), document_vectors)]}
            for index, (text, table, document_vectors) in enumerate(zip(texts, tables, vectors))]
        return JSONBytesResponse({"object": "list", "model": name, "data": data,
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @app.get("/models", response_model=ModelsResponse, tags=["native"])
    async def models(self) -> Response:
        """Served models: dimension, dtype, device, max_length, pooling, normalization, prompts, replicas."""
        cards = [ModelCard(**card).model_dump() for card in await self.list_models()]
        return JSONBytesResponse({"object": "list", "data": cards})

    @app.get("/health", response_model=HealthResponse, tags=["native"])
    async def health(self) -> Response:
        """Liveness: the ingress is up (no API key needed)."""
        return JSONBytesResponse({"status": "ok", "models": sorted(self._encoders)})
