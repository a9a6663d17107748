"""Bulk embedding with ``ray.data``: ``embed_dataset`` adds a vector column to any dataset.

The same split as the serving cluster: a tokenize stage on CPU actors folds
each text into segments (stored per row as ragged Arrow lists), then an encode
stage on GPU (or CPU) actors loads the model once per actor through the cache,
batches segments by a token budget (``encode_folded``) and writes vectors.
Rows whose text is null, not a string or empty keep flowing: their vector is
null and the ``error`` column says why. An input that already has a column the
stages write (``error``, ``num_tokens``, the output column, the chunk columns)
is refused, so that no user column is overwritten or read as the stages' own.

With ``chunks`` every document becomes one row per chunk (``chunk_index``,
``chunk_start``, ``chunk_end``, ``chunk_text``): late chunking pools each chunk
from its whole document in the encode stage; ``context="chunk"`` splits the
rows in the tokenize stage and embeds each chunk's text alone.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.data import ActorPoolStrategy, Dataset
from ray.exceptions import GetTimeoutError, RayActorError

from cluster.config import ClusterConfig
from deployments.cost import check_cost, text_cost
from deployments.errors import PayloadTooLargeError
from deployments.loading import concurrent_batches, load_encoder, load_indexer
from deployments.settings import LimitsSettings, ModelConfig
from deployments.validation import check_pooling, check_wordpieces, quantization_ranges, quantized, text_problem
from deployments.weight_store import STORE_NAME, STORE_NAMESPACE
from embedder.chunking import CHUNK_CONTEXTS, DEFAULT_CHUNK_SIZE, ChunkContext, check_chunking
from embedder.folded_batch import FoldedBatch
from embedder.inference import encode_folded
from embedder.quantization import check_precision, quantized_dtype, quantized_width
from embedder.sentence_pooling import check_pooling_modes

logger = logging.getLogger(__name__)

BulkLevel = Literal["pooled", "wordpiece"]
EMBEDDING_COLUMN = "embedding"
ERROR_COLUMN = "error"
TOKENS_COLUMN = "num_tokens"
_TOKEN_IDS = "__token_ids"
_SEGMENT_LENGTHS = "__segment_lengths"
_PROMPT_LENGTH = "__prompt_length"
_CHUNK_SPANS = "__chunk_spans"
_CHUNK_CHARS = "__chunk_chars"
_INTERNAL = (_TOKEN_IDS, _SEGMENT_LENGTHS, _PROMPT_LENGTH, _CHUNK_SPANS, _CHUNK_CHARS)
#: Why a row could not be read (a JSON line that is not an object, say): an input column the tokenize
#: stage turns into that row's ``error``, internal so that it never meets a user's own columns.
INPUT_ERROR_COLUMN = "__input_error"
CHUNK_INDEX, CHUNK_START, CHUNK_END, CHUNK_TEXT = "chunk_index", "chunk_start", "chunk_end", "chunk_text"
CHUNK_COLUMNS = (CHUNK_INDEX, CHUNK_START, CHUNK_END, CHUNK_TEXT)
NO_TOKENS = "text has no tokens"
BULK_WEIGHTS_USER = "bulk-{}/"
#: How long an encode actor that is shutting down waits for the weight store to forget it.
RELEASE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Chunking:
    """One output row per chunk: windows of whole words of at most ``chunk_size`` wordpieces, each
    starting ``chunk_size - chunk_overlap`` after the last; ``context`` ``"document"`` pools each
    chunk from its whole document (late chunking), ``"chunk"`` embeds each chunk's text alone."""

    chunk_size: int = DEFAULT_CHUNK_SIZE
    chunk_overlap: int = 0
    context: ChunkContext = "document"

    def __post_init__(self) -> None:
        check_chunking(self.chunk_size, self.chunk_overlap)
        if self.context not in CHUNK_CONTEXTS:
            raise ValueError(f"context must be one of {CHUNK_CONTEXTS}, not {self.context!r}")


def _one_row_per_chunk(table: pa.Table, counts: np.ndarray, starts: list[int | None], ends: list[int | None],
                       texts: list[str | None]) -> pa.Table:
    """``table`` with row ``i`` repeated ``counts[i]`` times (at least once, for a row without
    chunks) and the chunk columns appended."""
    repeats = np.maximum(counts, 1)
    exploded = table.take(np.repeat(np.arange(table.num_rows), repeats))
    index = np.arange(int(repeats.sum())) - np.repeat(np.cumsum(repeats) - repeats, repeats)
    return (exploded
            .append_column(CHUNK_INDEX, pa.array(index.astype(np.int32)))
            .append_column(CHUNK_START, pa.array(starts, type=pa.int32()))
            .append_column(CHUNK_END, pa.array(ends, type=pa.int32()))
            .append_column(CHUNK_TEXT, pa.array(texts, type=pa.string())))


def _chunk_columns(texts: list[Any], tables: list[np.ndarray | None]) -> tuple[np.ndarray, list, list, list]:
    """Chunks per document, and per chunk row its start, end and text (one row of ``None`` for a
    document without chunks)."""
    counts = np.array([0 if t is None else len(t) for t in tables], dtype=np.int64)
    rows: list[tuple] = []
    for text, chunks in zip(texts, tables):
        if chunks is None or not len(chunks):
            rows.append((None, None, None))
        else:
            rows.extend((start, end, text[start:end]) for start, end in chunks[:, :2].tolist())
    starts, ends, pieces = (list(column) for column in zip(*rows)) if rows else ([], [], [])
    return counts, starts, ends, pieces


def written_columns(output_column: str, chunks: Chunking | None) -> dict[str, str]:
    """The columns ``embed_dataset`` writes into each row, and what each one holds."""
    written = {output_column: "the vectors", TOKENS_COLUMN: "the wordpieces of each text",
               ERROR_COLUMN: "why a row has no vector"}
    if chunks is not None:
        written |= dict.fromkeys(CHUNK_COLUMNS, "the chunks")
    return written | dict.fromkeys(_INTERNAL, "internal")


def refuse_written_columns(columns: Iterable[str], written: dict[str, str], job: str) -> None:
    """Refuse an input that already has a column ``job`` writes (``written``: each one and what it
    holds): it would be overwritten, or read as the job's own (a user ``error`` column would fail
    every row that has a value there)."""
    clashes = [name for name in columns if name in written]
    if clashes:
        described = ", ".join(f"{name!r} ({written[name]})" for name in clashes)
        raise ValueError(f"the input already has the column{'s' * (len(clashes) > 1)} {described}, which the "
                         f"{job} job writes itself; rename that column in the input so that it is kept")


def check_input_columns(columns: Iterable[str], output_column: str = EMBEDDING_COLUMN,
                        chunks: Chunking | None = None) -> None:
    """``refuse_written_columns`` for the embedding job."""
    refuse_written_columns(columns, written_columns(output_column, chunks), "embedding")


def row_problem(value: Any, prompt: str | None = None, limits: LimitsSettings | None = None) -> str | None:
    """Why a row's text cannot be embedded (the serving path's rules: a text, within the one cost model's
    limits for a request of one input with ``prompt`` joined to it), or ``None``."""
    problem = text_problem(value)
    if problem is not None:
        return f"text {problem}"
    try:
        check_cost(text_cost([len(value)], joined=len(prompt or "")), limits or LimitsSettings())
    except PayloadTooLargeError as error:
        return error.message
    return None


def pop_input_errors(table: pa.Table) -> tuple[pa.Table, list[str | None]]:
    """``table`` without ``INPUT_ERROR_COLUMN``, and why each row could not be read (``None`` for
    every row of a table without that column): a job's first stage makes it the row's ``error``."""
    if INPUT_ERROR_COLUMN not in table.column_names:
        return table, [None] * table.num_rows
    return table.drop_columns([INPUT_ERROR_COLUMN]), table.column(INPUT_ERROR_COLUMN).to_pylist()


class TokenizeStage:
    """``map_batches`` class: texts -> folded segments, one ragged row per text (with ``chunking``,
    its chunks too; with ``context="chunk"``, one row per chunk, folded alone)."""

    def __init__(self, model: ModelConfig, text_column: str, truncate: bool, prompt: str | None,
                 chunking: Chunking | None = None, output_column: str = EMBEDDING_COLUMN,
                 limits: LimitsSettings | None = None) -> None:
        self._indexer = load_indexer(model)
        self._limits = limits or LimitsSettings()
        self._text_column = text_column
        self._output_column = output_column
        self._truncate = truncate
        self._prompt = prompt
        self._chunking = chunking

    def __call__(self, table: pa.Table) -> pa.Table:
        if self._text_column not in table.column_names:
            raise KeyError(f"the dataset has no column {self._text_column!r}; it has {table.column_names}")
        check_input_columns(table.column_names, self._output_column, self._chunking)
        table, earlier = pop_input_errors(table)
        texts = table.column(self._text_column).to_pylist()
        problems = [before or row_problem(t, self._prompt, self._limits) for before, t in zip(earlier, texts)]
        if self._chunking is not None and self._chunking.context == "chunk":
            table, texts, problems = self._split_into_chunks(table, texts, problems)
        valid = [i for i, problem in enumerate(problems) if problem is None]
        token_rows: list[np.ndarray | None] = [None] * len(texts)
        length_rows: list[np.ndarray | None] = [None] * len(texts)
        span_rows: list[np.ndarray | None] = [None] * len(texts)
        char_rows: list[np.ndarray | None] = [None] * len(texts)
        counts = np.zeros(len(texts), dtype=np.int32)
        late = self._chunking is not None and self._chunking.context == "document"
        prompt_length = self._indexer.prompt_length(self._prompt) if self._prompt and not late else 0
        if valid:
            batch = self._fold([texts[i] for i in valid], late)
            token_starts = np.concatenate(([0], np.cumsum(batch.segment_lengths)))
            segment_starts = np.concatenate(([0], np.cumsum(batch.segments_per_input)))
            chunk_starts = np.concatenate(([0], np.cumsum(batch.chunks_per_input))) if late else None
            for position, row in enumerate(valid):
                try:
                    check_wordpieces(int(batch.num_wordpieces[position]), self._limits.max_wordpieces_per_request)
                except PayloadTooLargeError as error:
                    problems[row] = error.message
                    continue
                first, last = segment_starts[position], segment_starts[position + 1]
                token_rows[row] = batch.token_ids[token_starts[first]:token_starts[last]]
                length_rows[row] = batch.segment_lengths[first:last]
                counts[row] = batch.num_wordpieces[position]
                if late:
                    chunks = slice(chunk_starts[position], chunk_starts[position + 1])
                    span_rows[row] = batch.chunk_spans[chunks].reshape(-1)
                    char_rows[row] = batch.chunk_char_spans[chunks].reshape(-1)
                    if not len(span_rows[row]):
                        problems[row] = NO_TOKENS
        ragged = pa.list_(pa.int32())
        return (table
                .append_column(_TOKEN_IDS, pa.array(token_rows, type=ragged))
                .append_column(_SEGMENT_LENGTHS, pa.array(length_rows, type=ragged))
                .append_column(_PROMPT_LENGTH, pa.array(np.full(len(texts), prompt_length, dtype=np.int32)))
                .append_column(_CHUNK_SPANS, pa.array(span_rows, type=ragged))
                .append_column(_CHUNK_CHARS, pa.array(char_rows, type=ragged))
                .append_column(TOKENS_COLUMN, pa.array(counts))
                .append_column(ERROR_COLUMN, pa.array(problems, type=pa.string())))

    def _fold(self, texts: list[str], late: bool) -> FoldedBatch:
        if late:
            return self._indexer.fold_chunks(texts, chunk_size=self._chunking.chunk_size,
                                             chunk_overlap=self._chunking.chunk_overlap, prompt=self._prompt)
        return self._indexer.fold(texts, truncate=self._truncate, prompt=self._prompt)

    def _split_into_chunks(self, table: pa.Table, texts: list, problems: list) -> tuple[pa.Table, list, list]:
        """One row per chunk of each document, the chunk's text to be embedded alone."""
        valid = [i for i, problem in enumerate(problems) if problem is None]
        tables: list[np.ndarray | None] = [None] * len(texts)
        if valid:
            plan = self._indexer.fold_chunks([texts[i] for i in valid], chunk_size=self._chunking.chunk_size,
                                             chunk_overlap=self._chunking.chunk_overlap)
            for row, chunks in zip(valid, plan.chunk_table()):
                tables[row] = chunks
                if not len(chunks):
                    problems[row] = NO_TOKENS
        counts, starts, ends, pieces = _chunk_columns(texts, tables)
        repeats = np.maximum(counts, 1)
        chunk_problems = np.repeat(np.array(problems, dtype=object), repeats).tolist()
        return _one_row_per_chunk(table, counts, starts, ends, pieces), pieces, chunk_problems


def _folded_rows(table: pa.Table, rows: np.ndarray, num_start: int, num_end: int, chunks: bool) -> FoldedBatch:
    """Rebuild one ``FoldedBatch`` from the ragged rows the tokenize stage wrote."""
    token_ids = table.column(_TOKEN_IDS).take(rows).combine_chunks()
    lengths = table.column(_SEGMENT_LENGTHS).take(rows).combine_chunks()
    spans = table.column(_CHUNK_SPANS).take(rows).combine_chunks() if chunks else None
    return FoldedBatch(
        token_ids=token_ids.flatten().to_numpy(zero_copy_only=False),
        segment_lengths=lengths.flatten().to_numpy(zero_copy_only=False),
        segments_per_input=lengths.value_lengths().to_numpy(zero_copy_only=False).astype(np.int32),
        num_wordpieces=table.column(TOKENS_COLUMN).take(rows).to_numpy().astype(np.int32),
        num_start_tokens=num_start,
        num_end_tokens=num_end,
        prompt_lengths=table.column(_PROMPT_LENGTH).take(rows).to_numpy().astype(np.int32),
        chunk_spans=None if spans is None else spans.flatten().to_numpy(zero_copy_only=False).reshape(-1, 2),
        chunk_char_spans=None if spans is None else table.column(_CHUNK_CHARS).take(rows).combine_chunks()
        .flatten().to_numpy(zero_copy_only=False).reshape(-1, 2),
        chunks_per_input=None if spans is None else (spans.value_lengths().to_numpy(zero_copy_only=False) // 2)
        .astype(np.int32),
    )


def actor_weights_user(prefix: str) -> str:
    """Who this encode actor holds its weights as: ``prefix`` and the actor's id (the process id
    outside an actor), so that each actor releases only its own hold."""
    return f"{prefix}/{ray.get_runtime_context().get_actor_id() or f'process-{os.getpid()}'}"


class EncodeStage:
    """``map_batches`` class: folded rows -> one float32 vector (or one per wordpiece) per row; with
    late chunking, one row per chunk; pooled vectors in ``precision`` (``fixed_size_list<int8 | uint8>``
    columns when quantized). Holds the weights in the weight store as
    ``actor_weights_user(weights_user)`` until ray.data shuts the pool down."""

    def __init__(self, model: ModelConfig, output_column: str, level: BulkLevel, pooling: str | list[str] | None,
                 normalize: bool | None, threads: int | None, weights_user: str, text_column: str = "text",
                 chunking: Chunking | None = None, precision: str = "float32") -> None:
        user = actor_weights_user(weights_user)
        self._weights_user = user if model.share_weights and ray.is_initialized() else None
        encoder, _ = load_encoder(model, threads, user=user)
        self._embedder, self._head = encoder.embedder, encoder.head
        self._pooling = pooling
        self._normalize = normalize
        self._model = model
        self._output_column = output_column
        self._level = level
        self._text_column = text_column
        self._late = chunking is not None and chunking.context == "document"
        self._precision = precision
        self._ranges = quantization_ranges(model, precision, check_pooling(pooling), normalize, None)

    def __del__(self) -> None:
        """Release this actor's hold on the weights: ray.data deletes its actors' UDF objects when it
        shuts a pool down gracefully (a killed or crashed actor keeps its hold until the prefix is
        released). The store itself stays, even with nothing left in it, for ``release_weights`` of the
        job to remove: removing it here would race the job's own release."""
        user = getattr(self, "_weights_user", None)
        if user is None or not ray.is_initialized():
            return
        try:
            store = ray.get_actor(STORE_NAME, namespace=STORE_NAMESPACE)
            ray.get(store.release.remote(user), timeout=RELEASE_TIMEOUT_S)
        except ValueError:  # no store: nothing is held
            pass
        except (RayActorError, GetTimeoutError) as error:
            logger.warning("could not release the weights of %s (%s)", user, error)

    def __call__(self, table: pa.Table) -> pa.Table:
        level = "chunk" if self._late else self._level
        dim = self._head.get_output_dim() if level in ("pooled", "chunk") else self._embedder.get_output_dim()
        ok = np.flatnonzero(table.column(ERROR_COLUMN).is_null().to_numpy(zero_copy_only=False))
        special = self._embedder.special_tokens
        vectors, tables = None, [None] * table.num_rows
        if len(ok):
            batch = _folded_rows(table, ok, special.num_start, special.num_end, chunks=self._late)
            vectors = encode_folded(self._embedder, batch, level=level, head=self._head, pooling=self._pooling,
                                    normalize=self._normalize, max_batch_tokens=self._model.max_batch_tokens)
            for row, chunks in zip(ok, batch.chunk_table() or []):
                tables[row] = chunks
            if self._precision != "float32":  # each vector on its own, as the serving path quantizes
                vectors = ([quantized(v, self._precision, self._ranges) for v in vectors] if self._late
                           else quantized(vectors, self._precision, self._ranges))
        if self._precision != "float32":
            dim = quantized_width(dim, self._precision)
        if self._late:
            return self._explode_chunks(table, ok, tables, vectors, dim)
        column = (self._pooled_column(table.num_rows, ok, vectors, dim, quantized_dtype(self._precision))
                  if self._level == "pooled" else self._wordpiece_column(table.num_rows, ok, vectors, dim))
        return table.drop_columns(list(_INTERNAL)).append_column(self._output_column, column)

    def _explode_chunks(self, table: pa.Table, ok: np.ndarray, tables: list[np.ndarray | None],
                           vectors: list[np.ndarray] | None, dim: int) -> pa.Table:
        """One row per chunk of each document (one row with a null vector for a document with an error)."""
        by_row: list[np.ndarray | None] = [None] * table.num_rows
        for row, document_vectors in zip(ok, vectors or []):
            by_row[row] = document_vectors
        counts, starts, ends, texts = _chunk_columns(table.column(self._text_column).to_pylist(), tables)
        tokens = np.concatenate([np.zeros(1, np.int64) if t is None else t[:, 2] for t in tables]).astype(np.int32)
        values = np.concatenate([np.zeros((1, dim), quantized_dtype(self._precision)) if v is None else v
                                 for v in by_row])
        missing = np.concatenate([[v is None] * max(len(v) if v is not None else 1, 1) for v in by_row])
        error = table.column(ERROR_COLUMN).take(np.repeat(np.arange(table.num_rows), np.maximum(counts, 1)))
        exploded = _one_row_per_chunk(table.drop_columns([*_INTERNAL, TOKENS_COLUMN, ERROR_COLUMN]), counts,
                                      starts, ends, texts)
        column = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), dim, mask=pa.array(missing))
        return (exploded.append_column(TOKENS_COLUMN, pa.array(tokens))
                .append_column(self._output_column, column).append_column(ERROR_COLUMN, error))

    @staticmethod
    def _pooled_column(num_rows: int, ok: np.ndarray, vectors: np.ndarray | None, dim: int,
                       dtype: np.dtype = np.dtype(np.float32)) -> pa.Array:
        values = np.zeros((num_rows, dim), dtype=dtype)
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


def model_stage_options(model: ModelConfig, actors: int, blocks_at_once: int = 1) -> dict[str, Any]:
    """``map_batches`` options of a stage whose ``actors`` each hold ``model``: the model's
    resources per actor, ``blocks_at_once`` blocks each (on threads of their own when more than one)."""
    return {"compute": ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=blocks_at_once,
                                         enable_true_multi_threading=blocks_at_once > 1),
            "num_cpus": model.num_cpus, "num_gpus": model.num_gpus or None,
            **({"resources": dict(model.resources)} if model.resources else {})}


def embed_dataset(
    ds: Dataset,
    model: ModelConfig | str | None = None,
    *,
    text_column: str = "text",
    output_column: str = EMBEDDING_COLUMN,
    level: BulkLevel = "pooled",
    pooling: str | list[str] | None = None,
    normalize: bool | None = None,
    truncate: bool = False,
    prompt_name: str | None = None,
    prompt: str | None = None,
    chunks: Chunking | None = None,
    precision: str = "float32",
    weights_user: str | None = None,
    batch_size: int = 256,
    tokenize_actors: int | None = None,
    encode_actors: int | None = None,
    tokenize_cpus: float = 0.5,
    encode_threads: int | None = None,
    limits: LimitsSettings | None = None,
) -> Dataset:
    """Add ``output_column`` (fixed-size float32 lists), ``num_tokens`` and ``error`` to ``ds``.

    ``model`` is a ``ModelConfig`` or the name of the default config's model
    (``None``: the bundled MiniLM). Every other column passes through; a column of ``ds``
    named like one of those written (see ``written_columns``) raises ``ValueError``, here when
    ``ds``'s schema is known without running it, else from its first batch (which ray.data
    wraps in a ``UserCodeException``). Long
    texts are folded, never truncated unless ``truncate``. ``prompt_name`` / ``prompt``
    choose a prompt as on ``/embed`` (the model's default prompt when neither is given).
    ``chunks`` gives one row per chunk of each document (see ``Chunking``) with the chunk
    columns; late chunking needs a model that mean-pools (or ``pooling="mean"``). ``precision``
    (``int8``, ``uint8``, ``binary``, ``ubinary``) writes pooled vectors quantized as on ``/embed``:
    ``fixed_size_list<int8 | uint8>`` of ``dim`` values (``ceil(dim / 8)`` bytes for the binary ones);
    int8/uint8 need the model's ranges (``quantization_ranges`` or ``calibration_corpus``).

    Each encode actor holds the model's weights in the cluster's weight store as
    ``<weights_user><model name>/<actor id>`` (``weights_user`` default: a new ``bulk-<id>/``)
    and releases them when ray.data shuts its pool down, which it does once the dataset is
    consumed to its end or its consumer stops. Pass your own ``weights_user`` and call
    ``deployments.weight_store.release_weights(weights_user)`` when done: it frees what actors
    killed on the way still hold, and removes the store once nobody holds anything.
    Pool sizes and CPU encoders' torch threads default from the resources free now. Each row is a
    request of one text to the serving path's ``limits`` (default ``LimitsSettings()``): a row past
    one gets its ``error`` and no vector, and the others keep flowing.
    """
    if level not in ("pooled", "wordpiece"):
        raise ValueError(f"level must be 'pooled' or 'wordpiece', not {level!r}")
    if model is None or isinstance(model, str):
        model = ClusterConfig().model(model) if model else ClusterConfig().models[0]
    model = model.resolved()
    prompt = model.prompt(prompt_name, prompt)
    if pooling is not None:
        check_pooling_modes(pooling)
    check_precision(precision)
    if precision != "float32" and level != "pooled":
        raise ValueError(f"precision {precision!r} quantizes pooled vectors; level must be 'pooled'")
    quantization_ranges(model, precision, check_pooling(pooling), normalize, None)
    schema = ds.schema(fetch_if_missing=False)
    if schema is not None:
        check_input_columns(schema.names, output_column, chunks)
    if chunks is not None and chunks.context == "document":
        if level != "pooled":
            raise ValueError("chunks give pooled vectors; level must be 'pooled'")
        modes = check_pooling_modes(pooling or model.pooling or "mean")
        if modes != ("mean",):
            raise ValueError(f"late chunking averages each chunk's wordpieces, but model {model.name!r} pools with "
                             f"{'+'.join(modes)}; pass pooling='mean' to chunk it anyway, or context 'chunk'")
    default_tokenizers, default_encoders = default_pool_sizes(model, tokenize_cpus)
    encode_actors = encode_actors or default_encoders
    if encode_threads is None and model.num_gpus == 0:
        encode_threads = default_encode_threads(encode_actors)
    blocks_at_once = 1 if model.num_gpus else concurrent_batches(
        model.model_copy(update={"torch_threads": encode_threads}), torch.device("cpu"))
    tokenized = ds.map_batches(
        TokenizeStage,
        fn_constructor_kwargs={"model": model, "text_column": text_column, "truncate": truncate, "prompt": prompt,
                               "chunking": chunks, "output_column": output_column, "limits": limits},
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=ActorPoolStrategy(size=tokenize_actors or default_tokenizers),
        num_cpus=tokenize_cpus,
    )
    return tokenized.map_batches(
        EncodeStage,
        fn_constructor_kwargs={"model": model, "output_column": output_column, "level": level,
                               "pooling": pooling, "normalize": normalize,
                               "threads": encode_threads and max(1, encode_threads // blocks_at_once),
                               "weights_user": f"{weights_user or BULK_WEIGHTS_USER.format(uuid.uuid4().hex[:8])}"
                                               f"{model.name}",
                               "text_column": text_column, "chunking": chunks, "precision": precision},
        batch_format="pyarrow",
        batch_size=batch_size,
        **model_stage_options(model, encode_actors, blocks_at_once),
    )
