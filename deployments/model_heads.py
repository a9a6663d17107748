"""The heads an encoder replica runs, one per kind of model, over the same continuous batcher.

``Encoder`` (``deployments.encoder``) owns batching, threads, health and metrics; a head owns
what depends on the kind of model: loading it, what one queued item is, running a batch of
items, the probe it is checked with, and what ``GET /models`` shows. ``HEADS`` maps each kind
the folder can hold (``ModelConfig.kind``) to its head.
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from deployments.errors import BadRequestError, PayloadTooLargeError
from deployments.loading import load_encoder, prepare_device
from deployments.protocol import EncodeOptions, EncodeResult, ScoreRequest, SparseRequest, SparseResult
from deployments.settings import ModelConfig
from deployments.validation import check_wordpieces
from embedder.chunking import TooManyChunksError
from embedder.cross_encoder import CrossEncoderScorer, ScoringPlan
from embedder.folded_batch import FoldedBatch
from embedder.inference import EncodeStats, encode_folded
from embedder.pair_windows import InputTooLongError
from embedder.sentence_pooling import check_pooling_modes
from embedder.sparse_encoder import LOGITS_BATCH_TOKENS, SparseEncoderModel, check_max_active_dims, csr_rows
from embedder.transformer_embedder import check_type_ids

WARM_UP_TEXT = "warm up the encoder"
WARM_UP_PAIR = ("warm up", "the reranker")


def finite_digest(values: np.ndarray, model: str) -> str:
    """16 hex digits of ``values``' sha256 (a probe's answer: it tells replicas' weights apart);
    ``RuntimeError`` when a value is not finite (a model that cannot run any more)."""
    if not np.isfinite(values).all():
        raise RuntimeError(f"model {model!r} answers non-finite values")
    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class EncodeItem:
    """One embedding request's folded inputs and options, as queued for a batch."""

    batch: FoldedBatch
    options: EncodeOptions

    @property
    def weight(self) -> int:
        return self.batch.num_tokens

    @property
    def tokenize_ms(self) -> float | None:
        return self.batch.tokenize_ms


@dataclass(frozen=True)
class ScoreItem:
    """One scoring request's tokenized segments, as queued for a batch."""

    plan: ScoringPlan
    tokenize_ms: float

    @property
    def weight(self) -> int:
        return self.plan.num_tokens


@dataclass
class BatchOutput:
    """A scoring batch's answer for one item: the logits of its segments."""

    logits: np.ndarray
    timings: dict[str, float]


class EmbeddingHead:
    """Pooled, wordpiece, word and chunk vectors of a sentence-transformers (or plain) encoder."""

    kind = "embedding"

    def __init__(self, model: ModelConfig, threads: int) -> None:
        self._config = model
        self.encoder, self.weights_source = load_encoder(model, threads)
        self._embedder, self._head = self.encoder.embedder, self.encoder.head
        self.device, self.dtype = self._embedder.device, self._embedder.dtype
        self.weights: nn.Module = self._embedder.transformer_model
        self.probe = EncodeItem(self.encoder.indexer.fold([WARM_UP_TEXT]), EncodeOptions())

    def probe_digest(self, result: EncodeResult) -> str:
        """The digest of the probe's answer (it tells replicas' weights apart); ``RuntimeError``
        when the answer is not finite (a model that cannot run any more)."""
        return finite_digest(result.vectors, self._config.name)

    def validate(self, item: EncodeItem) -> None:
        """``BadRequestError`` for what this model cannot do with the item (checked before queueing)."""
        batch, options = item.batch, item.options
        if options.level == "word" and not batch.has_words:
            raise BadRequestError("level 'word' needs pre-split words")
        max_length = self.encoder.settings.max_length
        if batch.num_segments and int(batch.segment_lengths.max()) > max_length:
            raise BadRequestError(f"a segment of {int(batch.segment_lengths.max())} wordpieces is longer than "
                                  f"model {self._config.name!r} takes ({max_length})")
        if options.level == "chunk" and not batch.has_chunks:
            raise BadRequestError("level 'chunk' needs documents folded for chunking")
        if options.pooling is not None:
            try:
                self._head.output_dim_for(check_pooling_modes(options.pooling))
            except ValueError as error:
                raise BadRequestError(f"model {self._config.name!r}: {error}") from None
        if batch.type_ids is not None:
            try:
                check_type_ids(torch.from_numpy(batch.type_ids), self._embedder.type_vocab_size)
            except ValueError as error:
                raise BadRequestError(f"model {self._config.name!r}: {error}") from None

    def run(self, items: list[EncodeItem], stats: EncodeStats) -> list[EncodeResult]:
        """Encode a batch of requests; requests with the same options share one pass."""
        groups: dict[EncodeOptions, list[int]] = defaultdict(list)
        for index, item in enumerate(items):
            groups[item.options].append(index)
        results: list[EncodeResult | None] = [None] * len(items)
        for options, indices in groups.items():
            batches = [items[i].batch for i in indices]
            vectors = encode_folded(self._embedder, batches, level=options.level, head=self._head,
                                    pooling=options.pooling, normalize=options.normalize,
                                    sub_token_mode=options.sub_token_mode,
                                    max_batch_tokens=self._config.max_batch_tokens, stats=stats)
            for i, batch, output in zip(indices, batches, vectors):
                results[i] = EncodeResult(vectors=output, num_wordpieces=batch.num_wordpieces,
                                          wordpieces=batch.wordpieces, chunks=batch.chunk_table())
        return results

    def info(self) -> dict:
        """What ``GET /models`` shows about this model."""
        config = self._embedder.config
        settings = self.encoder.settings
        return {
            "kind": self.kind,
            "model_name": self._config.model_name,
            "dim": self._head.get_output_dim(),
            "wordpiece_dim": self._embedder.get_output_dim(),
            "max_length": settings.max_length,
            "layers": int(config.num_hidden_layers),
            "last_layer_only": self._config.last_layer_only,
            "pooling": list(self._head.pooling_modes),
            "include_prompt": self._head.include_prompt,
            "normalize": self._head.normalizes,
            "head": [type(layer).__name__ for layer in self._head.layers],
            "prompts": settings.prompts,
            "default_prompt_name": settings.default_prompt_name,
        }


class PairScoreHead:
    """Scores of a sentence-transformers ``CrossEncoder`` folder: a reranker (one label) or a
    classifier (several), long documents read in windows (``embedder.cross_encoder``).
    Its weights load from disk in each replica (the weight store holds embedding models)."""

    def __init__(self, model: ModelConfig, threads: int) -> None:
        self._config = model
        device, dtype = prepare_device(model, threads)
        self.scorer = CrossEncoderScorer(model.model_name, max_length=model.max_length, dtype=dtype, device=str(device),
                                         max_batch_tokens=model.max_batch_tokens)
        self.kind = model.kind
        self.weights_source = "disk, no store"
        self.device, self.dtype = self.scorer.device, self.scorer.dtype
        self.weights: nn.Module = self.scorer.model
        self.probe = ScoreItem(self.scorer.plan([WARM_UP_PAIR]), 0.0)

    def probe_digest(self, result: BatchOutput) -> str:
        return finite_digest(result.logits, self._config.name)

    def validate(self, item: ScoreItem) -> None:
        """Nothing: planning checked the request."""

    def plan(self, request: ScoreRequest) -> ScoreItem:
        """The request tokenized into segments; 400/413 errors name the problem and the limit."""
        started = time.perf_counter()
        try:
            if request.texts is not None:
                plan = self.scorer.plan_texts(request.texts, truncate=request.truncate)
            else:
                plan = self.scorer.plan(request.pairs, truncate=request.truncate, aggregate=request.aggregate,
                                        window_overlap=request.window_overlap, prompt=request.prompt,
                                        max_windows=request.max_windows, windows=request.windows)
        except TooManyChunksError:
            raise PayloadTooLargeError(
                f"the documents are read in more than {request.max_windows} windows, over the limit "
                f"max_chunks_per_request={request.max_windows}; send fewer or shorter documents per request, "
                "or truncate: true") from None
        except InputTooLongError as error:
            raise PayloadTooLargeError(f"model {self._config.name!r}: {error}") from None
        except (TypeError, ValueError) as error:
            raise BadRequestError(f"model {self._config.name!r}: {error}") from None
        if request.max_tokens is not None and plan.num_tokens > request.max_tokens:
            raise PayloadTooLargeError(
                f"the request scores {plan.num_tokens} tokens (windows and queries included), over the limit "
                f"max_wordpieces_per_request={request.max_tokens}; split it into smaller requests")
        return ScoreItem(plan, 1000 * (time.perf_counter() - started))

    def run(self, items: list[ScoreItem], stats: EncodeStats) -> list[BatchOutput]:
        """Every item's segments in one pass (length-sorted sub-batches by the token budget)."""
        plans = [item.plan for item in items]
        stats.real_tokens += sum(plan.num_tokens for plan in plans)
        return [BatchOutput(logits, {}) for logits in self.scorer.logits(plans)]

    def info(self) -> dict:
        folder = self.scorer.folder
        labels = folder.config.id2label or {}
        return {
            "kind": self.kind,
            "model_name": self._config.model_name,
            "max_length": self.scorer.max_length,
            "layers": int(folder.config.num_hidden_layers),
            "labels": [str(labels.get(i, labels.get(str(i), f"LABEL_{i}"))) for i in range(folder.num_labels)],
            "activation": folder.activation.rsplit(".", 1)[-1],
            "activation_source": folder.activation_source,
            "activation_is_default": folder.activation_is_default,
            "prompts": self._config.prompts or {},
            "default_prompt_name": self._config.default_prompt_name or None,
        }


@dataclass(frozen=True)
class SparseItem:
    """One sparse request's folded inputs and its ``max_active_dims``, as queued for a batch."""

    batch: FoldedBatch
    max_active_dims: int | None
    tokenize_ms: float

    @property
    def weight(self) -> int:
        return self.batch.num_tokens


@dataclass
class SparseOutput:
    """A sparse batch's answer for one item: each input's non-zeros as ``(indices, values)``."""

    rows: list[tuple[np.ndarray, np.ndarray]]
    timings: dict[str, float]


class SparseHead:
    """SPLADE vectors of a sentence-transformers ``SparseEncoder`` folder (``embedder.sparse_encoder``):
    long inputs folded, the masked-LM's logits reduced sub-batch by sub-batch of at most
    ``SUB_BATCH_TOKENS`` tokens (2048 wordpieces against a 30k vocabulary are 250 MB of float32
    logits), only the non-zeros kept. Its weights load from disk in each replica."""

    kind = "sparse"
    SUB_BATCH_TOKENS = LOGITS_BATCH_TOKENS

    def __init__(self, model: ModelConfig, threads: int) -> None:
        self._config = model
        device, dtype = prepare_device(model, threads)
        self.model = SparseEncoderModel(model.model_name, max_length=model.max_length, dtype=dtype, device=str(device))
        self.weights_source = "disk, no store"
        self.device, self.dtype = self.model.device, next(self.model.model.parameters()).dtype
        self.weights: nn.Module = self.model.model
        self.probe = SparseItem(self.model.indexer.fold([WARM_UP_TEXT]), None, 0.0)

    def probe_digest(self, result: SparseOutput) -> str:
        return finite_digest(np.concatenate([values for _, values in result.rows]), self._config.name)

    def validate(self, item: SparseItem) -> None:
        """Nothing: planning checked the request."""

    def plan(self, request: SparseRequest) -> SparseItem | SparseResult:
        """The request folded for a batch; or, on a static route (inference-free SPLADE's queries: no
        transformer), its answer at once. 400/413 errors name the problem and the limit."""
        started = time.perf_counter()
        try:
            route = self.model.route(request.task)
            if route in self.model.static_routes:
                counts = np.array([len(ids) for ids in self.model.static_routes[route].tokenizer(
                    [request.prompt + text for text in request.texts], add_special_tokens=False)["input_ids"]])
                if request.max_tokens is not None:
                    check_wordpieces(int(counts.sum()), request.max_tokens)
                matrix = self.model.encode(request.texts, truncate=request.truncate, prompt=request.prompt,
                                           task=request.task, max_active_dims=request.max_active_dims)
                return SparseResult(csr_rows(matrix), counts,
                                    timings={"tokenization_ms": 1000 * (time.perf_counter() - started)})
            check_max_active_dims(request.max_active_dims)
            batch = self.model.indexer.fold(request.texts, truncate=request.truncate,
                                            truncation_direction=request.truncation_direction,
                                            prompt=request.prompt or None)
        except (TypeError, ValueError) as error:
            raise BadRequestError(f"model {self._config.name!r}: {error}") from None
        if request.max_tokens is not None:
            check_wordpieces(int(batch.num_wordpieces.sum()), request.max_tokens)
        return SparseItem(batch, request.max_active_dims, 1000 * (time.perf_counter() - started))

    def run(self, items: list[SparseItem], stats: EncodeStats) -> list[SparseOutput]:
        """Every item's inputs in one pass; items with the same ``max_active_dims`` share it."""
        groups: dict[int | None, list[int]] = defaultdict(list)
        for index, item in enumerate(items):
            groups[item.max_active_dims].append(index)
        outputs: list[SparseOutput | None] = [None] * len(items)
        for max_active_dims, indices in groups.items():
            batch = FoldedBatch.concat([items[i].batch for i in indices])
            stats.real_tokens += batch.num_tokens
            rows = csr_rows(self.model.encode_folded(batch, max_active_dims=max_active_dims,
                                                     max_batch_tokens=self.SUB_BATCH_TOKENS))
            bounds = np.cumsum([0] + [items[i].batch.num_inputs for i in indices])
            for i, start, end in zip(indices, bounds[:-1], bounds[1:]):
                outputs[i] = SparseOutput(rows[start:end], {})
        return outputs

    def info(self) -> dict:
        folder = self.model.folder
        return {
            "kind": self.kind,
            "model_name": self._config.model_name,
            "dim": self.model.vocab_size,
            "max_length": self.model.max_length,
            "layers": int(getattr(self.model.config, "num_hidden_layers", 0) or getattr(self.model.config, "n_layers", 0)),
            "pooling": [],
            "splade_pooling": folder.pooling_strategy,
            "activation": folder.activation_function,
            "max_active_dims": folder.max_active_dims,
            "routes": list(folder.routes),
            "default_route": folder.default_route,
            "prompts": self._config.prompts or {},
            "default_prompt_name": self._config.default_prompt_name or None,
        }


HEADS: dict[str, type[EmbeddingHead] | type[PairScoreHead] | type[SparseHead]] = {
    "embedding": EmbeddingHead,
    "reranker": PairScoreHead,
    "classifier": PairScoreHead,
    "sparse": SparseHead,
}
