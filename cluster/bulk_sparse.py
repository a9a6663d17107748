"""Bulk SPLADE vectors with ``ray.data``: ``sparse_dataset`` adds each row's sparse vector as
``sparse_indices`` (list<int32>, ascending) and ``sparse_values`` (list<float32>), the shape Qdrant,
Milvus and Elasticsearch ingest; ``run_sparse_job`` is ``embedding-cluster embed --sparse``.

One stage of actors (on GPUs, or CPUs) loads the sparse encoder once each (``SparseEncoderModel``,
as the serving cluster's sparse head) and encodes a block's texts together: long texts folded and
pooled over every segment unless ``truncate``, the masked-LM's logits reduced sub-batch by
sub-batch, only the non-zeros kept. A row whose text is null, not a string or empty keeps flowing
with null vectors and the reason in ``error``; the other rows of its block are encoded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import scipy.sparse
from ray.data import Dataset

from cluster.bulk import (
    ERROR_COLUMN,
    TOKENS_COLUMN,
    default_encode_threads,
    default_pool_sizes,
    model_stage_options,
    pop_input_errors,
    refuse_written_columns,
    row_problem,
)
from cluster.bulk_job import BulkSummary, run_job
from deployments.loading import prepare_device
from deployments.settings import ModelConfig
from embedder.sparse_encoder import (
    LOGITS_BATCH_TOKENS,
    SparseEncoderModel,
    check_max_active_dims,
    csr_rows,
    task_prompt_name,
)

logger = logging.getLogger(__name__)

SPARSE_INDICES, SPARSE_VALUES = "sparse_indices", "sparse_values"
#: The columns the sparse job writes into each row, and what each one holds.
SPARSE_JOB_COLUMNS = {SPARSE_INDICES: "the sparse vectors' dimensions", SPARSE_VALUES: "the sparse vectors' weights",
                      TOKENS_COLUMN: "the wordpieces of each text", ERROR_COLUMN: "why a row has no vector"}


def check_sparse_columns(columns: Iterable[str]) -> None:
    """``ValueError`` for an input column the sparse job writes itself (``SPARSE_JOB_COLUMNS``)."""
    refuse_written_columns(columns, SPARSE_JOB_COLUMNS, "sparse embedding")


def check_sparse_options(model: ModelConfig, prompt_name: str | None, prompt: str | None, task: str | None,
                         max_active_dims: int | None) -> ModelConfig:
    """``model`` resolved, after a ``ValueError`` (naming the model) unless its folder is a sparse
    encoder (``ModelConfig.kind``), and for a prompt, task or ``max_active_dims`` it does not take.
    Reads the folder, loads no weights."""
    if model.kind != "sparse":
        raise ValueError(f"model {model.name!r} ({model.model_name}) is of kind {model.kind!r}: sparse vectors need "
                         "a SparseEncoder (SPLADE) folder, or a *ForMaskedLM folder with pooling: splade")
    model = model.resolved()
    model.prompt(prompt_name, prompt)
    check_max_active_dims(max_active_dims)
    if task is not None and task not in ("query", "document"):
        raise ValueError(f"task must be 'query' or 'document', not {task!r}")
    return model


class SparseStage:
    """``map_batches`` class: texts -> ``sparse_indices``, ``sparse_values``, ``num_tokens``, ``error``.
    Loads the sparse encoder once, on the device Ray gave the actor, in the model's dtype (``"auto"``:
    the fastest there, as the serving cluster), with ``threads`` torch threads on a CPU."""

    def __init__(self, model: ModelConfig, text_column: str, truncate: bool, prompt: str | None, task: str | None,
                 max_active_dims: int | None, threads: int | None = None) -> None:
        device, dtype = prepare_device(model, threads)
        self._model = SparseEncoderModel(model.model_name, max_length=model.max_length, dtype=dtype,
                                         device=str(device))
        self._route = self._model.route(task)
        self._text_column = text_column
        self._truncate = truncate
        self._prompt = prompt
        self._max_active_dims = max_active_dims

    def __call__(self, table: pa.Table) -> pa.Table:
        if self._text_column not in table.column_names:
            raise KeyError(f"the dataset has no column {self._text_column!r}; it has {table.column_names}")
        check_sparse_columns(table.column_names)
        table, earlier = pop_input_errors(table)
        texts = table.column(self._text_column).to_pylist()
        problems = [before or row_problem(text) for before, text in zip(earlier, texts)]
        valid = [row for row, problem in enumerate(problems) if problem is None]
        rows: list[tuple[np.ndarray, np.ndarray] | None] = [None] * table.num_rows
        counts = np.zeros(table.num_rows, dtype=np.int32)
        if valid:
            matrix, tokens = self._encode([texts[row] for row in valid])
            for row, vector, count in zip(valid, csr_rows(matrix), tokens):
                rows[row], counts[row] = vector, count
        ragged_ints, ragged_floats = pa.list_(pa.int32()), pa.list_(pa.float32())
        return (table
                .append_column(SPARSE_INDICES, pa.array([None if r is None else r[0] for r in rows], type=ragged_ints))
                .append_column(SPARSE_VALUES, pa.array([None if r is None else r[1] for r in rows],
                                                       type=ragged_floats))
                .append_column(TOKENS_COLUMN, pa.array(counts))
                .append_column(ERROR_COLUMN, pa.array(problems, type=pa.string())))

    def _encode(self, texts: list[str]) -> tuple[scipy.sparse.csr_matrix, np.ndarray]:
        """The texts' sparse vectors and wordpieces: on a static route (inference-free SPLADE's
        queries) each present token's weight, else the masked-LM over the folded texts."""
        model = self._model
        if self._route in model.static_routes:
            prompted = [(self._prompt or "") + text for text in texts]
            counts = [len(ids) for ids in model.static_routes[self._route].tokenizer(
                prompted, add_special_tokens=False, truncation=self._truncate)["input_ids"]]
            matrix = model.encode(texts, truncate=self._truncate, prompt=self._prompt, task=self._route,
                                  max_active_dims=self._max_active_dims)
            return matrix, np.asarray(counts, dtype=np.int32)
        batch = model.indexer.fold(texts, truncate=self._truncate, prompt=self._prompt)
        matrix = model.encode_folded(batch, max_active_dims=self._max_active_dims,
                                     max_batch_tokens=LOGITS_BATCH_TOKENS)
        return matrix, batch.num_wordpieces


def sparse_dataset(
    ds: Dataset,
    model: ModelConfig,
    *,
    text_column: str = "text",
    truncate: bool = False,
    prompt_name: str | None = None,
    prompt: str | None = None,
    task: str | None = None,
    max_active_dims: int | None = None,
    batch_size: int = 256,
    encode_actors: int | None = None,
    threads: int | None = None,
) -> Dataset:
    """Add ``sparse_indices``, ``sparse_values``, ``num_tokens`` and ``error`` to ``ds`` (see the module).

    ``model`` is a ``ModelConfig`` of kind ``sparse`` (``ValueError`` at once for any other, and for an
    input column the job writes when ``ds``'s schema is known). Vectors are ``SparseEncoder.encode``'s
    with the prompt ``prompt_name`` / ``prompt`` choose as on ``/embed_sparse`` (with neither, the
    ``task``'s prompt as ``encode_query`` / ``encode_document`` pick it, else the model's default); ``task`` (``query``, ``document``) picks an inference-free model's
    route as ``encode_query`` / ``encode_document`` do, ``max_active_dims`` keeps each vector's k
    largest weights. Pool size and CPU actors' torch threads default from the resources free now.
    """
    model = check_sparse_options(model, prompt_name, prompt, task, max_active_dims)
    prompt_name = task_prompt_name(model.prompts or {}, task, prompt_name, prompt)
    schema = ds.schema(fetch_if_missing=False)
    if schema is not None:
        check_sparse_columns(schema.names)
    actors = encode_actors or default_pool_sizes(model, 0.0)[1]
    if threads is None and model.num_gpus == 0:
        threads = default_encode_threads(actors)
    return ds.map_batches(
        SparseStage,
        fn_constructor_kwargs={"model": model, "text_column": text_column, "truncate": truncate,
                               "prompt": model.prompt(prompt_name, prompt), "task": task,
                               "max_active_dims": max_active_dims, "threads": threads},
        batch_format="pyarrow",
        batch_size=batch_size,
        **model_stage_options(model, actors),
    )


def run_sparse_job(
    source: str,
    output: str | Path,
    model: ModelConfig,
    *,
    text_column: str = "text",
    id_column: str | None = None,
    truncate: bool = False,
    prompt_name: str | None = None,
    prompt: str | None = None,
    task: str | None = None,
    max_active_dims: int | None = None,
    resume: bool = False,
    rows_per_part: int = 10_000,
    batch_size: int = 256,
    encode_actors: int | None = None,
    show_progress: bool = True,
) -> BulkSummary:
    """The sparse vectors of every row of ``source`` into parquet parts under ``output``
    (``bulk_job.run_job``: the input formats, ``resume`` per id and the refusals of the embedding
    job; see ``sparse_dataset``)."""
    model = check_sparse_options(model, prompt_name, prompt, task, max_active_dims)
    options: dict[str, Any] = {"text_column": text_column, "truncate": truncate, "prompt_name": prompt_name,
                               "prompt": prompt, "task": task, "max_active_dims": max_active_dims,
                               "batch_size": batch_size, "encode_actors": encode_actors}
    return run_job(source, output, lambda ds: sparse_dataset(ds, model, **options), text_columns=text_column,
                   check_columns=check_sparse_columns, id_column=id_column, resume=resume,
                   rows_per_part=rows_per_part, batch_size=batch_size, show_progress=show_progress,
                   description="sparse vectors")
