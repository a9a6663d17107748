"""Bulk embedding with ``ray.data``: ``embed_dataset`` adds a vector column to any dataset.

The same split as the serving cluster: a tokenize stage on CPU actors folds
each text into segments (stored per row as ragged Arrow lists), then an encode
stage on GPU (or CPU) actors loads the model once per actor through the cache,
batches segments by a token budget (``encode_folded``) and writes vectors.
Rows whose text is null, not a string or empty keep flowing: their vector is
null and the ``error`` column says why.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy, Dataset

from cluster.config import ClusterConfig
from deployments.loading import load_encoder, load_indexer
from deployments.settings import ModelConfig
from embedder.folded_batch import FoldedBatch
from embedder.inference import encode_folded
from embedder.sentence_pooling import check_pooling_modes

logger = logging.getLogger(__name__)

BulkLevel = Literal["pooled", "wordpiece"]
ERROR_COLUMN = "error"
TOKENS_COLUMN = "num_tokens"
_TOKEN_IDS = "__token_ids"
_SEGMENT_LENGTHS = "__segment_lengths"
_PROMPT_LENGTH = "__prompt_length"
_INTERNAL = (_TOKEN_IDS, _SEGMENT_LENGTHS, _PROMPT_LENGTH)


def text_problem(value: Any) -> str | None:
    """Why a value cannot be embedded, or ``None`` when it can."""
    if value is None:
        return "text is null"
    if not isinstance(value, str):
        return f"text is {type(value).__name__}, not a string"
    if not value.strip():
        return "text is empty"
    return None


class TokenizeStage:
    """``map_batches`` class: texts -> folded segments, one ragged row per text."""

    def __init__(self, model: ModelConfig, text_column: str, truncate: bool, prompt: str | None) -> None:
        self._indexer = load_indexer(model)
        self._text_column = text_column
        self._truncate = truncate
        self._prompt = prompt

    def __call__(self, table: pa.Table) -> pa.Table:
        if self._text_column not in table.column_names:
            raise KeyError(f"the dataset has no column {self._text_column!r}; it has {table.column_names}")
        texts = table.column(self._text_column).to_pylist()
        earlier = (table.column(ERROR_COLUMN).to_pylist() if ERROR_COLUMN in table.column_names
                   else [None] * len(texts))
        problems = [before or text_problem(t) for before, t in zip(earlier, texts)]
        valid = [i for i, problem in enumerate(problems) if problem is None]
        token_rows: list[np.ndarray | None] = [None] * len(texts)
        length_rows: list[np.ndarray | None] = [None] * len(texts)
        counts = np.zeros(len(texts), dtype=np.int32)
        prompt_length = self._indexer.prompt_length(self._prompt) if self._prompt else 0
        if valid:
            batch = self._indexer.fold([texts[i] for i in valid], truncate=self._truncate, prompt=self._prompt)
            token_starts = np.concatenate(([0], np.cumsum(batch.segment_lengths)))
            segment_starts = np.concatenate(([0], np.cumsum(batch.segments_per_input)))
            for position, row in enumerate(valid):
                first, last = segment_starts[position], segment_starts[position + 1]
                token_rows[row] = batch.token_ids[token_starts[first]:token_starts[last]]
                length_rows[row] = batch.segment_lengths[first:last]
                counts[row] = batch.num_wordpieces[position]
        if ERROR_COLUMN in table.column_names:
            table = table.drop_columns([ERROR_COLUMN])
        return (table
                .append_column(_TOKEN_IDS, pa.array(token_rows, type=pa.list_(pa.int32())))
                .append_column(_SEGMENT_LENGTHS, pa.array(length_rows, type=pa.list_(pa.int32())))
                .append_column(_PROMPT_LENGTH, pa.array(np.full(len(texts), prompt_length, dtype=np.int32)))
                .append_column(TOKENS_COLUMN, pa.array(counts))
                .append_column(ERROR_COLUMN, pa.array(problems, type=pa.string())))


def _folded_rows(table: pa.Table, rows: np.ndarray, num_start: int, num_end: int) -> FoldedBatch:
    """Rebuild one ``FoldedBatch`` from the ragged rows the tokenize stage wrote."""
    token_ids = table.column(_TOKEN_IDS).take(rows).combine_chunks()
    lengths = table.column(_SEGMENT_LENGTHS).take(rows).combine_chunks()
    return FoldedBatch(
        token_ids=token_ids.flatten().to_numpy(zero_copy_only=False),
        segment_lengths=lengths.flatten().to_numpy(zero_copy_only=False),
        segments_per_input=lengths.value_lengths().to_numpy(zero_copy_only=False).astype(np.int32),
        num_wordpieces=table.column(TOKENS_COLUMN).take(rows).to_numpy().astype(np.int32),
        num_start_tokens=num_start,
        num_end_tokens=num_end,
        prompt_lengths=table.column(_PROMPT_LENGTH).take(rows).to_numpy().astype(np.int32),
    )


class EncodeStage:
    """``map_batches`` class: folded rows -> one float32 vector (or one per wordpiece) per row."""

    def __init__(self, model: ModelConfig, output_column: str, level: BulkLevel, pooling: str | list[str] | None,
                 normalize: bool | None, threads: int | None) -> None:
        encoder, _ = load_encoder(model, threads)
        self._embedder, self._head = encoder.embedder, encoder.head
        self._pooling = pooling
        self._normalize = normalize
        self._model = model
        self._output_column = output_column
        self._level = level

    def __call__(self, table: pa.Table) -> pa.Table:
        dim = self._head.get_output_dim() if self._level == "pooled" else self._embedder.get_output_dim()
        ok = np.flatnonzero(table.column(ERROR_COLUMN).is_null().to_numpy(zero_copy_only=False))
        special = self._embedder.special_tokens
        vectors = None
        if len(ok):
            batch = _folded_rows(table, ok, special.num_start, special.num_end)
            vectors = encode_folded(self._embedder, batch, level=self._level, head=self._head, pooling=self._pooling,
                                    normalize=self._normalize, max_batch_tokens=self._model.max_batch_tokens)
        column = (self._pooled_column if self._level == "pooled" else self._wordpiece_column)(
            table.num_rows, ok, vectors, dim)
        return table.drop_columns(list(_INTERNAL)).append_column(self._output_column, column)

    @staticmethod
    def _pooled_column(num_rows: int, ok: np.ndarray, vectors: np.ndarray | None, dim: int) -> pa.Array:
        values = np.zeros((num_rows, dim), dtype=np.float32)
        if vectors is not None:
            values[ok] = vectors
        mask = np.ones(num_rows, dtype=bool)
        mask[ok] = False
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), dim, mask=pa.array(mask))

    @staticmethod
    def _wordpiece_column(num_rows: int, ok: np.ndarray, vectors: list[np.ndarray] | None, dim: int) -> pa.Array:
        rows: list[np.ndarray | None] = [None] * num_rows
        for row, array in zip(ok, vectors or []):
            rows[row] = array
        lengths = np.array([0 if r is None else len(r) for r in rows], dtype=np.int32)
        flat = np.concatenate([r for r in rows if r is not None]) if len(ok) else np.zeros((0, dim), np.float32)
        inner = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), dim)
        offsets = pa.array(np.concatenate(([0], np.cumsum(lengths))).astype(np.int32))
        mask = pa.array([r is None for r in rows])
        return pa.ListArray.from_arrays(offsets, inner, mask=mask)


#: CPUs the actor pools leave free for reading, parsing and writing tasks.
RESERVED_CPUS = 0.5


def default_encode_threads(encoders: int) -> int:
    """Torch threads per CPU encoder actor: the free cores shared among the encoders
    (tokenizing is a few percent of the work, so the tokenizers need no core of their own)."""
    return max(1, int(ray.available_resources().get("CPU", 1.0) // max(encoders, 1)))


def default_pool_sizes(model: ModelConfig, tokenize_cpus: float) -> tuple[int, int]:
    """Actors per stage from the resources free now: an encoder per GPU (or per
    ``num_cpus`` left after the tokenizers and the I/O tasks), a tokenizer per four CPUs."""
    resources = ray.available_resources()
    cpus, gpus = resources.get("CPU", 1.0), resources.get("GPU", 0.0)
    tokenizers = max(1, int(cpus // 4))
    if model.num_gpus > 0:
        encoders = max(1, int(gpus // model.num_gpus))
    else:
        free = cpus - tokenizers * tokenize_cpus - RESERVED_CPUS
        encoders = max(1, int(free // max(model.num_cpus, 0.01)))
    return tokenizers, encoders


def embed_dataset(
    ds: Dataset,
    model: ModelConfig | str | None = None,
    *,
    text_column: str = "text",
    output_column: str = "embedding",
    level: BulkLevel = "pooled",
    pooling: str | list[str] | None = None,
    normalize: bool | None = None,
    truncate: bool = False,
    prompt_name: str | None = None,
    prompt: str | None = None,
    batch_size: int = 256,
    tokenize_actors: int | None = None,
    encode_actors: int | None = None,
    tokenize_cpus: float = 0.5,
    encode_threads: int | None = None,
) -> Dataset:
    """Add ``output_column`` (fixed-size float32 lists), ``num_tokens`` and ``error`` to ``ds``.

    ``model`` is a ``ModelConfig`` or the name of the default config's model
    (``None``: the bundled MiniLM). Every other column passes through. Long
    texts are folded, never truncated unless ``truncate``. ``prompt_name`` / ``prompt``
    choose a prompt as on ``/embed`` (the model's default prompt when neither is given).
    Pool sizes and CPU encoders' torch threads default from the resources free now.
    """
    if level not in ("pooled", "wordpiece"):
        raise ValueError(f"level must be 'pooled' or 'wordpiece', not {level!r}")
    if model is None or isinstance(model, str):
        model = ClusterConfig().model(model) if model else ClusterConfig().models[0]
    model = model.resolved()
    prompt = model.prompt(prompt_name, prompt)
    if pooling is not None:
        check_pooling_modes(pooling)
    default_tokenizers, default_encoders = default_pool_sizes(model, tokenize_cpus)
    encode_actors = encode_actors or default_encoders
    if encode_threads is None and model.num_gpus == 0:
        encode_threads = default_encode_threads(encode_actors)
    tokenized = ds.map_batches(
        TokenizeStage,
        fn_constructor_kwargs={"model": model, "text_column": text_column, "truncate": truncate, "prompt": prompt},
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=ActorPoolStrategy(size=tokenize_actors or default_tokenizers),
        num_cpus=tokenize_cpus,
    )
    return tokenized.map_batches(
        EncodeStage,
        fn_constructor_kwargs={"model": model, "output_column": output_column, "level": level,
                               "pooling": pooling, "normalize": normalize, "threads": encode_threads},
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=ActorPoolStrategy(size=encode_actors),
        num_cpus=model.num_cpus,
        num_gpus=model.num_gpus or None,
        **({"resources": dict(model.resources)} if model.resources else {}),
    )
