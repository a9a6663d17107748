"""Tokenizing and folding requests: texts, pairs or words -> ``FoldedBatch``, for every served model.

``RequestFolder`` does the work; the ``Tokenizer`` deployment runs it for big
requests, and the ingress runs it in place for small ones (one hop fewer).
"""

from __future__ import annotations

import logging
import time

from ray import serve

from deployments.cost import check_answer_rows
from deployments.errors import BadRequestError, PayloadTooLargeError, UnknownModelError
from deployments.loading import load_indexer
from deployments.protocol import FoldRequest
from deployments.settings import LimitsSettings, ModelConfig
from deployments.validation import check_wordpieces
from embedder.chunking import TooManyChunksError
from embedder.folded_batch import FoldedBatch

logger = logging.getLogger(__name__)


class RequestFolder:
    """Every served embedding model's indexer (from the process-wide tokenizer cache) and the request
    limits (rerankers and classifiers tokenize in their own replicas)."""

    def __init__(self, models: list[ModelConfig], limits: LimitsSettings) -> None:
        self._limits = limits
        self._indexers = {model.name: load_indexer(model) for model in models if model.kind == "embedding"}

    def fold(self, request: FoldRequest) -> FoldedBatch:
        """The request's inputs tokenized and folded; 400/404/413 errors name the problem."""
        started = time.perf_counter()
        indexer = self._indexers.get(request.model)
        if indexer is None:
            raise UnknownModelError(f"no model named {request.model!r}; served: {sorted(self._indexers)}")
        limits = self._limits
        try:
            if request.chunks is not None:
                batch = indexer.fold_chunks(request.texts, chunk_size=request.chunks.chunk_size,
                                            chunk_overlap=request.chunks.chunk_overlap, spans=request.chunks.spans,
                                            prompt=request.prompt, return_wordpieces=request.return_wordpieces,
                                            max_chunks=limits.max_chunks_per_request)
            else:
                batch = indexer.fold(request.texts, pairs=request.pairs, words=request.words,
                                     token_ids=request.token_ids, truncate=request.truncate,
                                     truncation_direction=request.truncation_direction, prompt=request.prompt,
                                     return_wordpieces=request.return_wordpieces)
        except TooManyChunksError:
            raise PayloadTooLargeError(
                f"the documents give more than {limits.max_chunks_per_request} chunks, over the limit "
                f"max_chunks_per_request={limits.max_chunks_per_request}; use a larger chunk_size, less "
                "overlap or fewer documents per request") from None
        except (TypeError, ValueError) as error:
            raise BadRequestError(str(error)) from None
        check_wordpieces(int(batch.num_wordpieces.sum()), limits.max_wordpieces_per_request)
        check_answer_rows(int(batch.num_wordpieces.sum()), request.max_answer_rows, limits)
        if batch.has_chunks:
            pooled = int((batch.chunk_spans[:, 1] - batch.chunk_spans[:, 0]).sum())
            if pooled > limits.max_chunk_wordpieces_per_request:
                raise PayloadTooLargeError(
                    f"the request's chunks pool {pooled} wordpieces (overlaps counted again), over the limit "
                    f"max_chunk_wordpieces_per_request={limits.max_chunk_wordpieces_per_request}; use less "
                    "overlap, shorter spans or fewer documents per request")
        batch.tokenize_ms = 1000 * (time.perf_counter() - started)
        return batch


@serve.deployment(name="tokenizer")
class Tokenizer:
    """Tokenizes and folds on CPU; one deployment serves every model."""

    def __init__(self, models: list[ModelConfig], limits: LimitsSettings) -> None:
        self._folder = RequestFolder(models, limits)

    def fold(self, request: FoldRequest) -> FoldedBatch:
        return self._folder.fold(request)
