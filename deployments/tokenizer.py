"""The tokenizer deployment: texts, pairs or words -> ``FoldedBatch``, for every served model."""

from __future__ import annotations

import logging

from ray import serve

from deployments.errors import BadRequestError, PayloadTooLargeError, UnknownModelError
from deployments.loading import load_indexer
from deployments.protocol import FoldRequest
from deployments.settings import LimitsSettings, ModelConfig
from embedder.folded_batch import FoldedBatch

logger = logging.getLogger(__name__)


@serve.deployment(name="tokenizer")
class Tokenizer:
    """Tokenizes and folds on CPU; one deployment serves every model's tokenizer
    (indexers come from the process-wide tokenizer cache)."""

    def __init__(self, models: list[ModelConfig], limits: LimitsSettings) -> None:
        self._limits = limits
        self._indexers = {model.name: load_indexer(model) for model in models}

    def fold(self, request: FoldRequest) -> FoldedBatch:
        indexer = self._indexers.get(request.model)
        if indexer is None:
            raise UnknownModelError(f"no model named {request.model!r}; served: {sorted(self._indexers)}")
        try:
            batch = indexer.fold(request.texts, pairs=request.pairs, words=request.words,
                                 truncate=request.truncate, return_wordpieces=request.return_wordpieces)
        except (TypeError, ValueError) as error:
            raise BadRequestError(str(error)) from None
        total = int(batch.num_wordpieces.sum())
        if total > self._limits.max_wordpieces_per_request:
            raise PayloadTooLargeError(
                f"the request has {total} wordpieces, over the limit of "
                f"{self._limits.max_wordpieces_per_request} per request; split it into smaller requests")
        return batch
