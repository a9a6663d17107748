"""``EmbeddingPipeline``: a request's way through the cluster, and the handle API built on it.

Each request is validated, tokenized (here for small requests, by the tokenizer
deployment otherwise: its response is passed straight into the encoder call, so
the folded batch travels tokenizer -> encoder through the object store, never
through this replica), encoded by its model's encoder deployment, and retried
once if a replica died mid-call. The ingress deployment is this class plus its
HTTP routes; ``cluster.EmbeddingClient`` calls the public methods by handle.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar, Token
from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from deployments.coalescing import CallCoalescer
from deployments.cost import RequestCost, check_cost, fold_cost, precision_width, wordpiece_answer_rows
from deployments.errors import (
    BadRequestError,
    EmbeddingRequestError,
    OverloadedError,
    ReplicaFailedError,
    UnknownModelError,
    as_request_error,
)
from deployments.metrics import IngressMetrics
from deployments.protocol import ChunkRequest, EncodeOptions, EncodeResult, FoldRequest
from deployments.settings import LimitsSettings, ModelConfig, ServingSettings, deployment_name
from deployments.tokenizer import RequestFolder
from deployments.schema import EmbedChunksRequest, EmbedRequest, EmbedTokensRequest, TokenizeRequest
from deployments.validation import (
    check_chunk_options,
    check_pairs,
    check_pooling,
    check_texts,
    check_token_ids,
    check_words,
    parse_request,
    quantization_ranges,
    quantized,
    truncate_dimensions,
)
from embedder.chunking import DEFAULT_CHUNK_SIZE
from embedder.folded_batch import FoldedBatch
from embedder.folding import unfold_index
from embedder.quantization import PRECISIONS, RANGED_PRECISIONS
from embedder.sentence_pooling import check_pooling_modes

logger = logging.getLogger(__name__)

#: The stages' times of the request being answered (milliseconds), for the routes' timing headers.
_timings: ContextVar[dict[str, float] | None] = ContextVar("request_timings", default=None)


def collect_timings() -> tuple[dict[str, float], Token]:
    """Start collecting the current request's stage times (``tokenization_ms``, ``queue_ms``,
    ``inference_ms``); ``stop_timings(token)`` ends it."""
    timings: dict[str, float] = {}
    return timings, _timings.set(timings)


def stop_timings(token: Token) -> None:
    _timings.reset(token)


#: Calls ``GET /models`` makes to a model's replicas to learn their dtypes and devices.
MAX_REPLICAS_ASKED = 16
#: How long those answers serve ``GET /models`` while the model's running replicas stay as many: a
#: client polling ``/models`` must not add load that the autoscaler would answer with replicas.
PLACEMENTS_TTL_S = 60.0
#: How long a readiness answer serves ``GET /ready``.
READY_TTL_S = 1.0
#: What a model's readiness says when none of its replicas runs or will: its deployment failed, or Serve
#: says its replicas have waited long to be scheduled (resources the cluster does not have). Not
#: UNHEALTHY: a replica that died is replaced, and a request waits for it (and is retried once).
UNPLACED_MARKS = ("DEPLOY_FAILED", "to be scheduled")


def replica_placements(infos: list[dict]) -> dict:
    """``dtype``/``device`` (``"mixed"`` when replicas differ) and every value seen, from replicas' infos."""
    dtypes, devices = sorted({i["dtype"] for i in infos}), sorted({i["device"] for i in infos})
    return {"dtype": dtypes[0] if len(dtypes) == 1 else "mixed", "dtypes": dtypes,
            "device": devices[0] if len(devices) == 1 else "mixed", "devices": devices}


def quantization_card(config: ModelConfig) -> dict:
    """What ``GET /models`` shows of an embedding model's precisions and ranges."""
    if config.kind != "embedding":
        return {}
    ranges = config.ranges
    return {"precisions": [p for p in PRECISIONS if ranges is not None or p not in RANGED_PRECISIONS],
            "quantization_ranges": None if ranges is None else ranges.card()}


def echoed_chunk_chars(texts: list[str], chunking: ChunkRequest, limits: LimitsSettings) -> int:
    """Characters an ``/embed_chunks`` answer gives back, at most: each span's text, or, for chunks of
    ``chunk_size`` wordpieces, each character once per chunk it may be in (overlap counted), and never
    more than the most chunks a request may have, each as long as the longest document."""
    if chunking.spans is not None:
        return sum(max(0, min(end, len(text)) - max(start, 0))
                   for text, spans in zip(texts, chunking.spans) for start, end in spans)
    step = chunking.chunk_size - chunking.chunk_overlap
    repeats = -(-chunking.chunk_size // step)
    return min(sum(map(len, texts)) * repeats, limits.max_chunks_per_request * max(map(len, texts), default=0))


class EmbeddingPipeline:
    """Validation, folding, encoding and retries for every served model."""

    def __init__(self, settings: ServingSettings, tokenizer: DeploymentHandle,
                 encoders: dict[str, DeploymentHandle]) -> None:
        self._settings = settings
        self._limits = settings.limits
        self._tokenizer = tokenizer
        self._folder = (RequestFolder(settings.models, settings.limits)
                        if settings.ingress.inline_tokenize_max_chars else None)
        self._encoders = encoders
        merging = settings.ingress.merge_in_flight
        self._coalescer = CallCoalescer(merging, settings.ingress.merge_max_requests) if merging else None
        self._configs = {model.name: model for model in settings.models}
        self._default_model = settings.models[0].name
        self._infos: dict[str, dict] = {}
        #: per model: its replicas' infos, how many replicas ran when they were asked, and when
        self._placements: dict[str, tuple[list[dict], int, float]] = {}
        self._metrics = IngressMetrics()
        self._started = int(time.time())
        #: readiness as last computed, and when; the computation in flight (one at a time)
        self._readiness: tuple[dict[str, str], float] | None = None
        self._readiness_call: asyncio.Future | None = None

    # --- the way through -------------------------------------------------------

    def _model(self, model: str | None, kinds: tuple[str, ...] = ("embedding",), route: str = "embedding") -> str:
        """The served model a request names (the first one when it names none), if it is of one of
        ``kinds``: 404 for a model not served, 400 naming its kind for one that cannot answer ``route``."""
        name = model or self._default_model
        if name not in self._encoders:
            raise UnknownModelError(f"no model named {name!r}; served: {sorted(self._encoders)}")
        kind = self._configs[name].kind
        if kind not in kinds:
            raise BadRequestError(f"model {name!r} is a {kind} model; {route} needs {' or '.join(kinds)} models")
        return name

    async def _run(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """A deployment call, its errors mapped to the client's (a server fault propagates, to be
        logged once where it is answered)."""
        try:
            return await call()
        except EmbeddingRequestError:
            raise
        except Exception as error:
            mapped = as_request_error(error)
            if mapped is None:
                raise
            raise mapped from None

    async def _retrying(self, call: Callable[[], Awaitable[Any]], cost: int) -> Any:
        """``_run``, once more when a replica died mid-call and the request is small enough (``cost``
        characters, at most ``limits.max_retried_chars``): model calls are idempotent, and Serve routes
        the second try to a live replica, but a request that killed its replica by its size must not
        kill another."""
        try:
            return await self._run(call)
        except ReplicaFailedError:
            if cost > self._limits.max_retried_chars:
                logger.warning("a replica failed under a request of %d characters; not resending it "
                               "(over max_retried_chars=%d)", cost, self._limits.max_retried_chars)
                raise
            logger.warning("a replica failed mid-request; retrying once")
            return await self._run(call)

    def _tokenizes_here(self, fold: FoldRequest) -> bool:
        return (self._folder is not None
                and fold.tokenizing_cost <= self._settings.ingress.inline_tokenize_max_chars)

    def _fold(self, fold: FoldRequest) -> FoldedBatch | DeploymentResponse:
        """The folded batch (small requests), or the tokenizer deployment's response to pass on."""
        return self._folder.fold(fold) if self._tokenizes_here(fold) else self._tokenizer.fold.remote(fold)

    async def _folded(self, fold: FoldRequest) -> FoldedBatch:
        """The folded batch itself, here (small requests) or from the tokenizer deployment."""
        if self._tokenizes_here(fold):
            return self._folder.fold(fold)
        return await self._retrying(lambda: self._tokenizer.fold.remote(fold), fold.tokenizing_cost)

    async def _call_model(self, model: str, route: str, call: Callable[[], Awaitable[Any]], cost: int) -> Any:
        """A model deployment call (``_retrying``), counted in the metrics, its stages' times added
        to the request's timings."""
        started = time.monotonic()
        tags = {"model": model, "route": route}
        status = "error"
        try:
            await self._refuse_unplaced(model)
            result = await self._retrying(call, cost)
            status = "ok"
        except EmbeddingRequestError as error:
            status = str(error.status_code)
            raise
        finally:
            self._metrics.requests.inc(tags=tags | {"status": status})
        self._metrics.latency.observe(1000 * (time.monotonic() - started), tags=tags)
        timings = _timings.get()
        if timings is not None:
            for stage, milliseconds in result.timings.items():
                timings[stage] = timings.get(stage, 0.0) + milliseconds
        return result

    def _encode_call(self, fold: FoldRequest, options: EncodeOptions) -> Callable[[], Awaitable[EncodeResult]]:
        """The encoder call of one request: merged with other small requests' (``CallCoalescer``) when it
        is tokenized here, else its own handle call."""
        encoder = self._encoders[fold.model]
        if self._coalescer is None or not self._tokenizes_here(fold):
            return lambda: encoder.encode.remote(self._fold(fold), options)

        async def send(batches: list[FoldedBatch]) -> list:
            results = await encoder.encode_merged.remote(batches, options)
            self._metrics.requests_per_call.observe(len(batches), tags={"model": fold.model})
            for result in results:
                if isinstance(result, EncodeResult):
                    result.timings["merged_requests"] = len(batches)
            return results

        return lambda: self._coalescer.submit((fold.model, options), self._folder.fold(fold), send)

    async def _encode(self, fold: FoldRequest, options: EncodeOptions, route: str) -> EncodeResult:
        result: EncodeResult = await self._call_model(fold.model, route, self._encode_call(fold, options),
                                                      fold.tokenizing_cost)
        tags = {"model": fold.model, "route": route}
        self._metrics.inputs.inc(len(result.num_wordpieces), tags=tags)
        self._metrics.wordpieces.inc(int(result.num_wordpieces.sum()), tags=tags)
        return result

    def _prompt(self, model: str, prompt_name: str | None, prompt: str | None) -> str | None:
        """The prompt text a request asks for (the model's default prompt when it names none)."""
        try:
            return self._configs[model].prompt(prompt_name, prompt)
        except ValueError as error:
            raise BadRequestError(f"model {model!r}: {error}") from None

    def _texts_or_words(self, model: str, request: TokenizeRequest | EmbedTokensRequest,
                        return_wordpieces: bool, max_answer_rows: int | None = None) -> FoldRequest:
        texts, words = request.inputs, request.words
        return FoldRequest(model=model, texts=None if texts is None else check_texts(texts, self._limits),
                           words=None if words is None else check_words(words, self._limits),
                           truncate=request.truncate, truncation_direction=request.truncation_direction,
                           prompt=self._prompt(model, request.prompt_name, request.prompt),
                           return_wordpieces=return_wordpieces, max_answer_rows=max_answer_rows)

    async def _model_info(self, name: str) -> dict:
        """The model's settings as its replicas report them (asked once; a 503 at once when no replica
        runs or will, as for ``_call_model``)."""
        if name not in self._infos:
            await self._refuse_unplaced(name)
            self._infos[name] = await self._run(lambda: self._encoders[name].info.remote())
        return self._infos[name]

    def _check_cost(self, cost: RequestCost) -> RequestCost:
        """The one place a request's cost meets the limits (413 naming the limit past which it is)."""
        return check_cost(cost, self._limits)

    async def _pooled_width(self, name: str, modes: tuple[str, ...] | None, dimensions: int | None) -> int:
        """Dimensions of one pooled vector of the model, with a request's pooling modes and ``dimensions``."""
        info = await self._model_info(name)
        width = info["dim"] if modes is None else max(info["dim"], info["wordpiece_dim"] * len(modes))
        return width if dimensions is None else min(width, dimensions)

    async def _renormalizes(self, name: str, normalize: bool | None) -> bool:
        """Whether cut vectors (``dimensions``) are normalized again: the request's say, else the model's."""
        return (await self._model_info(name))["normalize"] if normalize is None else normalize

    # --- the requests, validated: HTTP routes pass their bodies, the handle API its arguments ----

    async def embed_request(self, request: EmbedRequest, route: str) -> tuple[np.ndarray, np.ndarray]:
        """Pooled vectors ``[n, dim]`` (one per text, or per pair) and each input's wordpiece count."""
        return await self.pooled_vectors(
            request.model, texts=request.inputs, pairs=request.pairs, pooling=request.pooling,
            normalize=request.normalize, truncate=request.truncate, truncation_direction=request.truncation_direction,
            dimensions=request.dimensions, prompt_name=request.prompt_name, prompt=request.prompt,
            precision=request.precision, route=route)

    async def pooled_vectors(self, model: str | None, *, texts: Any = None, pairs: Any = None, token_ids: Any = None,
                             pooling: Any = None, normalize: bool | None = None, truncate: bool = False,
                             truncation_direction: str | None = None, dimensions: int | None = None,
                             prompt_name: str | None = None, prompt: str | None = None, precision: str = "float32",
                             route: str) -> tuple[np.ndarray, np.ndarray]:
        """Pooled vectors of exactly one of texts, pairs or token ids (in ``precision``: float32, or
        quantized after ``dimensions`` and normalization), and each input's wordpiece count."""
        name = self._model(model)
        if sum(x is not None for x in (texts, pairs, token_ids)) != 1:
            raise BadRequestError("give exactly one of texts, pairs or token ids")
        modes = check_pooling(pooling)
        ranges = quantization_ranges(self._configs[name], precision, modes, normalize, dimensions)
        fold = FoldRequest(model=name, truncate=truncate, truncation_direction=truncation_direction,
                           prompt=None if token_ids is not None else self._prompt(name, prompt_name, prompt),
                           texts=None if texts is None else check_texts(texts, self._limits),
                           pairs=None if pairs is None else check_pairs(pairs, self._limits),
                           token_ids=None if token_ids is None else check_token_ids(token_ids, self._limits))
        values, value_bytes = precision_width(await self._pooled_width(name, modes, dimensions), precision)
        self._check_cost(fold_cost(fold, vectors=len(fold.input_lengths), width=values, value_bytes=value_bytes))
        options = EncodeOptions(level="pooled", pooling=modes, normalize=normalize)
        result = await self._encode(fold, options, route)
        vectors = result.vectors
        if dimensions is not None:
            vectors = truncate_dimensions(vectors, dimensions, await self._renormalizes(name, normalize))
        return quantized(vectors, precision, ranges), result.num_wordpieces

    async def token_vectors_request(self, request: EmbedTokensRequest,
                                    route: str) -> tuple[list[np.ndarray], list[list[str]]]:
        """Per input: ``[tokens, dim]`` vectors and the tokens (wordpieces, or the words)."""
        name = self._model(request.model)
        width = (await self._model_info(name))["wordpiece_dim"]
        per_wordpiece = request.level == "wordpiece"
        most_rows = wordpiece_answer_rows(width, self._limits) if per_wordpiece else None
        fold = self._texts_or_words(name, request, return_wordpieces=per_wordpiece, max_answer_rows=most_rows)
        self._check_cost(fold_cost(fold, vectors=0 if per_wordpiece else sum(map(len, fold.words)), width=width))
        result = await self._encode(fold, EncodeOptions(level=request.level, sub_token_mode=request.sub_token_mode),
                                    route)
        tokens = result.wordpieces if request.level == "wordpiece" else fold.words
        return result.vectors, tokens

    async def tokenize_request(self, request: TokenizeRequest) -> list[dict]:
        """The wordpieces, ids and segments of each input, as the encoder would see them."""
        name = self._model(request.model)
        fold = self._texts_or_words(name, request, return_wordpieces=True)
        self._check_cost(fold_cost(fold, vectors=0))
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

    async def chunks_request(self, request: EmbedChunksRequest,
                             route: str) -> tuple[list[np.ndarray], list[np.ndarray], int]:
        """Per document: its chunks ``[n, 3]`` (start and end characters, wordpieces) and their vectors
        ``[n, dim]``; and the wordpieces embedded. ``context="document"`` pools each chunk from the whole
        document's encoding (late chunking); ``"chunk"`` embeds each chunk's text alone."""
        name = self._model(request.model)
        texts = check_texts(request.inputs, self._limits)
        spans = check_chunk_options(request.chunk_size, request.chunk_overlap, request.spans, len(texts),
                                    self._limits)
        chunking = ChunkRequest(chunk_size=request.chunk_size, chunk_overlap=request.chunk_overlap, spans=spans)
        prompt_text = self._prompt(name, request.prompt_name, request.prompt)
        modes, normalize = check_pooling(request.pooling), request.normalize
        ranges = quantization_ranges(self._configs[name], request.precision, modes, normalize, request.dimensions)
        values, value_bytes = precision_width(await self._pooled_width(name, modes, request.dimensions),
                                              request.precision)
        document = FoldRequest(model=name, texts=texts, prompt=prompt_text, chunks=chunking)
        most_chunks = sum(map(len, spans)) if spans else self._limits.max_chunks_per_request
        self._check_cost(fold_cost(document, vectors=most_chunks, width=values, value_bytes=value_bytes,
                                   echoed_chars=echoed_chunk_chars(texts, chunking, self._limits)))
        if request.context == "document":
            model_modes = check_pooling_modes(self._configs[name].pooling or "mean")
            if (modes or model_modes) != ("mean",):
                raise BadRequestError(
                    f"late chunking averages each chunk's wordpieces, but model {name!r} pools with "
                    f"{'+'.join(modes or model_modes)}; send \"pooling\": \"mean\" to chunk it anyway, or "
                    f"\"context\": \"chunk\" to embed each chunk alone")
            result = await self._encode(document, EncodeOptions(level="chunk", normalize=normalize), route)
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
        if request.dimensions is not None:
            renormalize = await self._renormalizes(name, normalize)
            vectors = [truncate_dimensions(v, request.dimensions, renormalize) for v in vectors]
        vectors = [quantized(v, request.precision, ranges) for v in vectors]
        return tables, vectors, int(result.num_wordpieces.sum())

    # --- handle API (cluster.EmbeddingClient): the arguments checked by the routes' own models -----

    async def embed_texts(self, texts: Any = None, model: str | None = None, pooling: Any = None,
                          normalize: bool | None = None, truncate: bool = False, dimensions: int | None = None,
                          pairs: Any = None, prompt_name: str | None = None, prompt: str | None = None,
                          truncation_direction: str | None = None,
                          precision: Any = "float32") -> tuple[np.ndarray, np.ndarray]:
        """``POST /embed`` by handle."""
        request = parse_request(EmbedRequest, inputs=texts, pairs=pairs, model=model, pooling=pooling,
                                normalize=normalize, truncate=truncate, truncation_direction=truncation_direction,
                                dimensions=dimensions, prompt_name=prompt_name, prompt=prompt, precision=precision)
        return await self.embed_request(request, "handle")

    async def embed_token_vectors(self, texts: Any = None, words: Any = None, model: str | None = None,
                                  level: str = "wordpiece", sub_token_mode: str = "avg", truncate: bool = False,
                                  prompt_name: str | None = None, prompt: str | None = None,
                                  truncation_direction: str | None = None) -> tuple[list[np.ndarray], list[list[str]]]:
        """``POST /embed_tokens`` by handle."""
        request = parse_request(EmbedTokensRequest, inputs=texts, words=words, model=model, level=level,
                                sub_token_mode=sub_token_mode, truncate=truncate, prompt_name=prompt_name,
                                prompt=prompt, truncation_direction=truncation_direction)
        return await self.token_vectors_request(request, "handle")

    async def tokenize_inputs(self, texts: Any = None, words: Any = None, model: str | None = None,
                              truncate: bool = False, prompt_name: str | None = None, prompt: str | None = None,
                              truncation_direction: str | None = None) -> list[dict]:
        """``POST /tokenize`` by handle."""
        return await self.tokenize_request(parse_request(
            TokenizeRequest, inputs=texts, words=words, model=model, truncate=truncate, prompt_name=prompt_name,
            prompt=prompt, truncation_direction=truncation_direction))

    async def embed_document_chunks(self, texts: Any = None, model: str | None = None,
                                    chunk_size: Any = DEFAULT_CHUNK_SIZE, chunk_overlap: Any = 0, spans: Any = None,
                                    context: str = "document", pooling: Any = None, normalize: bool | None = None,
                                    dimensions: int | None = None, prompt_name: str | None = None,
                                    prompt: str | None = None,
                                    precision: Any = "float32") -> tuple[list[np.ndarray], list[np.ndarray], int]:
        """``POST /embed_chunks`` by handle."""
        request = parse_request(EmbedChunksRequest, inputs=texts, model=model, chunk_size=chunk_size,
                                chunk_overlap=chunk_overlap, spans=spans, context=context, pooling=pooling,
                                normalize=normalize, dimensions=dimensions, prompt_name=prompt_name, prompt=prompt,
                                precision=precision)
        return await self.chunks_request(request, "handle")

    async def list_models(self) -> list[dict]:
        """Every served model with its settings, its deployment's status and its replicas by state.
        Dtype and device are asked of several replicas (each decides on its own node's hardware):
        ``"mixed"`` with the values in ``dtypes`` / ``devices`` when they differ."""
        statuses = await asyncio.to_thread(self._deployment_statuses)
        cards = []
        for config in self._settings.models:
            status = statuses.get(config.name, {})
            infos = await self._replica_infos(config.name, status.get("replicas", {}).get("running", 0))
            cards.append({"id": config.name, "created": self._started, **infos[0], **replica_placements(infos),
                          **status, **quantization_card(config)})
        return cards

    async def _replica_infos(self, name: str, running: int) -> list[dict]:
        """Infos of several of the model's replicas, asked one after another (one call in flight
        at a time: no load the autoscaler would see), again only when as many replicas run as at
        the last asking and ``PLACEMENTS_TTL_S`` has not passed; the last answers while none runs."""
        cached = self._placements.get(name)
        if cached is not None and (not running or (cached[1] == running
                                                   and time.monotonic() - cached[2] < PLACEMENTS_TTL_S)):
            return cached[0]
        infos = [await self._run(lambda: self._encoders[name].info.remote())
                 for _ in range(min(MAX_REPLICAS_ASKED, 2 * running + 1))]
        self._placements[name] = (infos, running, time.monotonic())
        self._infos[name] = infos[0]
        return infos

    async def _refuse_unplaced(self, model: str) -> None:
        """503 at once, saying why, for a model none of whose replicas runs or will: its deployment
        failed, or its replicas wait for resources the cluster does not have (Serve says they have
        taken long to be scheduled). A request would otherwise wait until it timed out. The readiness
        seen is at most ``READY_TTL_S`` old, else the last one while a new one is asked for."""
        if self._readiness is None:
            waiting = await self.not_ready()
        else:
            waiting = self._readiness[0]
            if time.monotonic() - self._readiness[1] >= READY_TTL_S:
                asyncio.ensure_future(self.not_ready())
        reason = waiting.get(model)
        if reason is not None and any(mark in reason for mark in UNPLACED_MARKS):
            raise OverloadedError(f"model {model!r} has no replica to answer it: {reason}")

    async def not_ready(self) -> dict[str, str]:
        """The models without a running replica (one runs only once it has answered a forward
        pass), each with its deployment's status and message; empty when every model is ready.
        The answer serves ``READY_TTL_S`` (``/ready`` needs no key and is not counted in flight: each
        computation is a controller call, so probes at any rate make at most one a second)."""
        cached = self._readiness
        if cached is not None and time.monotonic() - cached[1] < READY_TTL_S:
            return cached[0]
        if self._readiness_call is None or self._readiness_call.done():
            self._readiness_call = asyncio.ensure_future(self._compute_not_ready())
        waiting = await asyncio.shield(self._readiness_call)
        self._readiness = (waiting, time.monotonic())
        return waiting

    async def _compute_not_ready(self) -> dict[str, str]:
        statuses = await asyncio.to_thread(self._deployment_statuses)
        waiting = {}
        for config in self._settings.models:
            status = statuses.get(config.name)
            if status is None or not status["replicas"].get("running"):
                waiting[config.name] = "no deployment" if status is None else (
                    f"{status['status']}: {status['status_message'] or 'no running replica yet'}")
        return waiting

    def _deployment_statuses(self) -> dict[str, dict]:
        """Per model: its deployment's status, message, and replicas by state (``serve.status()``)."""
        try:
            application = serve.status().applications.get(serve.get_replica_context().app_name)
        except Exception as error:  # the controller is unreachable: say nothing rather than fail the route
            logger.warning("no deployment status: the Serve controller did not answer (%s)", type(error).__name__)
            return {}
        if application is None:
            return {}
        statuses = {}
        for config in self._settings.models:
            deployment = application.deployments.get(deployment_name(config.name))
            if deployment is not None:
                statuses[config.name] = {
                    "status": str(getattr(deployment.status, "value", deployment.status)),
                    "status_message": deployment.message,
                    "replicas": {str(getattr(state, "value", state)).lower(): count
                                 for state, count in deployment.replica_states.items()},
                }
        return statuses
