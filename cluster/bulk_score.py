"""Bulk reranking with ``ray.data``: ``score_dataset`` adds a cross-encoder's score of each row's
(query, document) pair, ``run_score_job`` is the ``embedding-cluster score`` job.

One stage of actors (on GPUs, or CPUs) loads the reranker once each (``CrossEncoderScorer``)
and scores a block's pairs together, length-sorted in batches of the model's
``max_batch_tokens``: a pair that fits as ``CrossEncoder.predict`` scores it, a longer one by
its document's windows beside the whole query (the best window, MaxP, unless
``aggregate`` says ``first`` or ``mean``), or cut as ``predict`` cuts it with ``truncate``.
Each row gets ``score`` (float32; a fixed-size list of float32 per label for a model of several
labels), ``window_start`` and ``window_end`` (the character span of the document that gave the
score) and ``error``. A row whose query is null or not a string, whose document is null, not a
string or empty, whose document would need more than ``max_windows`` windows, or whose query is
too long to read a long document beside, keeps flowing with a null score and the reason in
``error``; the other rows of its block are scored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from ray.data import Dataset

from cluster.bulk import (
    ERROR_COLUMN,
    default_encode_threads,
    default_pool_sizes,
    model_stage_options,
    pop_input_errors,
    refuse_written_columns,
)
from cluster.bulk_job import BulkSummary, run_job
from deployments.loading import prepare_device
from deployments.settings import ModelConfig
from deployments.validation import text_problem
from embedder import CrossEncoderScorer, PairScore
from embedder.pair_windows import AGGREGATES

logger = logging.getLogger(__name__)

SCORE_COLUMN, WINDOW_START, WINDOW_END = "score", "window_start", "window_end"
#: The columns the scoring job writes into each row, and what each one holds.
SCORE_JOB_COLUMNS = {SCORE_COLUMN: "the scores", WINDOW_START: "the scored span", WINDOW_END: "the scored span",
                     ERROR_COLUMN: "why a row has no score"}
#: Windows one document may be read in, at most, unless told: a row past it gets an error (its
#: work is bounded), not thousands of forward passes. 256 windows of a 512-token reranker read
#: about 100,000 wordpieces of one document.
DEFAULT_MAX_WINDOWS = 256


def check_score_columns(columns: Iterable[str]) -> None:
    """``ValueError`` for an input column the scoring job writes itself (``SCORE_JOB_COLUMNS``)."""
    refuse_written_columns(columns, SCORE_JOB_COLUMNS, "scoring")


def check_score_options(model: ModelConfig, query_column: str, document_column: str, aggregate: str,
                        max_windows: int) -> ModelConfig:
    """``model`` resolved (its length made explicit), after a ``ValueError`` (naming the model) unless
    its folder is a reranker or a classifier (``ModelConfig.kind``), and for options no row could be
    scored with."""
    if query_column == document_column:
        raise ValueError(f"the query and the document column are both {query_column!r}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, not {aggregate!r}")
    if not isinstance(max_windows, int) or isinstance(max_windows, bool) or max_windows < 1:
        raise ValueError(f"max_windows must be a positive integer, not {max_windows!r}")
    if model.kind not in ("reranker", "classifier"):
        raise ValueError(f"model {model.name!r} ({model.model_name}) is of kind {model.kind!r}: scoring pairs "
                         "needs a reranker or a classifier (a CrossEncoder folder)")
    return model.resolved()


def pair_problem(query: Any, document: Any) -> str | None:
    """Why a row's pair cannot be scored, or ``None``: a query must be a string (an empty one is a
    query CrossEncoder scores), a document a non-empty one (the serving path's rule)."""
    if not isinstance(query, str):
        return f"query {text_problem(query)}"
    problem = text_problem(document)
    return None if problem is None else f"document {problem}"


class ScoreStage:
    """``map_batches`` class: (query, document) rows -> ``score``, ``window_start``, ``window_end``,
    ``error``. Loads the reranker once, on the device Ray gave the actor, in the model's dtype
    (``"auto"``: the fastest there, as the embedding job), with ``threads`` torch threads on a CPU.
    Its tokenizer is a ``SharedTokenizer`` (each thread tokenizes with its own copy)."""

    def __init__(self, model: ModelConfig, query_column: str, document_column: str, truncate: bool,
                 aggregate: str, activate: bool, max_windows: int, threads: int | None = None) -> None:
        device, dtype = prepare_device(model, threads)
        self._scorer = CrossEncoderScorer(model.model_name, max_length=model.max_length, dtype=dtype,
                                          device=device, max_batch_tokens=model.max_batch_tokens)
        self._query_column = query_column
        self._document_column = document_column
        self._truncate = truncate
        self._aggregate = aggregate
        self._activate = activate
        self._max_windows = max_windows

    def __call__(self, table: pa.Table) -> pa.Table:
        for column in (self._query_column, self._document_column):
            if column not in table.column_names:
                raise KeyError(f"the dataset has no column {column!r}; it has {table.column_names}")
        check_score_columns(table.column_names)
        table, earlier = pop_input_errors(table)
        queries = table.column(self._query_column).to_pylist()
        documents = table.column(self._document_column).to_pylist()
        problems = [before or pair_problem(q, d) for before, q, d in zip(earlier, queries, documents)]
        valid = [row for row, problem in enumerate(problems) if problem is None]
        for row, problem in zip(valid, self._screen([queries[r] for r in valid], [documents[r] for r in valid])):
            problems[row] = problem
        valid = [row for row, problem in enumerate(problems) if problem is None]
        results: dict[int, PairScore] = {}
        for row, outcome in zip(valid, self._score([(queries[r], documents[r]) for r in valid])):
            if isinstance(outcome, PairScore):
                results[row] = outcome
            else:
                problems[row] = outcome
        return (table
                .append_column(SCORE_COLUMN, self._score_column(table.num_rows, results))
                .append_column(WINDOW_START, pa.array([results[r].start if r in results else None
                                                       for r in range(table.num_rows)], type=pa.int64()))
                .append_column(WINDOW_END, pa.array([results[r].end if r in results else None
                                                     for r in range(table.num_rows)], type=pa.int64()))
                .append_column(ERROR_COLUMN, pa.array(problems, type=pa.string())))

    def _screen(self, queries: list[str], documents: list[str]) -> list[str | None]:
        """Why each pair cannot be scored within bounds, or ``None``: a document with no tokens, or
        one that does not fit beside its query and cannot be read in windows (``_window_problem``).
        Only the pairs that do not fit are planned window by window."""
        scorer = self._scorer
        unique = list(dict.fromkeys(queries))
        query_pieces = dict(zip(unique, self._pieces(unique)))
        problems: list[str | None] = []
        for query, document, length in zip(queries, documents, self._pieces(documents)):
            fits = self._truncate or query_pieces[query] + length + scorer.num_special <= scorer.max_length
            problems.append("document has no tokens" if not length
                            else None if fits else self._window_problem(query, document, length))
        return problems

    def _pieces(self, texts: list[str]) -> list[int]:
        """Each text's wordpieces, specials left out."""
        if not texts:
            return []
        encoded = self._scorer.tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                                         return_token_type_ids=False, verbose=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def _window_problem(self, query: str, document: str, length: int) -> str | None:
        """Why a document that does not fit beside its query cannot be read in windows, or ``None``:
        under ``max`` with several labels; beside a query longer than half the model's length; in more
        than ``max_windows`` windows (refused unplanned when its wordpieces alone fill more than
        ``max_windows`` model inputs)."""
        scorer, limit = self._scorer, self._max_windows
        if self._aggregate == "max" and scorer.num_labels > 1:
            return (f"the document's {length} wordpieces need windows (max_length {scorer.max_length}), and the "
                    f"maximum over windows needs a one-label model (this one has {scorer.num_labels} labels): use "
                    "aggregate 'mean' or 'first', or truncate")
        if length > limit * scorer.max_length:
            return (f"the document's {length} wordpieces need more than max_windows {limit} windows of max_length "
                    f"{scorer.max_length}")
        try:
            windows = len(scorer.plan_windows(query, document))
        except ValueError as error:
            return str(error).removeprefix("pair 0: ")
        if windows > limit:
            return (f"the document needs {windows} windows of max_length {scorer.max_length}, more than "
                    f"max_windows {limit}")
        return None

    def _score(self, pairs: list[tuple[str, str]]) -> list[PairScore | str]:
        """Each pair's score, all in one call; should that call refuse one of them (what the screen
        cannot foresee), each pair alone, so that only that row gets the error."""
        options = {"truncate": self._truncate, "aggregate": self._aggregate, "activate": self._activate}
        try:
            return list(self._scorer.score_pairs(pairs, batch_size=max(len(pairs), 1),
                                                 max_windows=self._max_windows * max(len(pairs), 1), **options))
        except (ValueError, TypeError) as error:
            logger.info("scoring %d pairs one by one (%s)", len(pairs), error)
        outcomes: list[PairScore | str] = []
        for pair in pairs:
            try:
                outcomes.extend(self._scorer.score_pairs([pair], max_windows=self._max_windows, **options))
            except (ValueError, TypeError) as error:
                outcomes.append(str(error).removeprefix("pair 0: "))
        return outcomes

    def _score_column(self, num_rows: int, results: dict[int, PairScore]) -> pa.Array:
        labels = self._scorer.num_labels
        values = np.zeros((num_rows, labels), dtype=np.float32)
        for row, result in results.items():
            values[row] = result.score
        mask = np.array([row not in results for row in range(num_rows)], dtype=bool)
        if labels == 1:
            return pa.array(values[:, 0], mask=mask)
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), labels, mask=pa.array(mask))


def score_dataset(
    ds: Dataset,
    model: ModelConfig,
    *,
    query_column: str = "query",
    document_column: str = "text",
    truncate: bool = False,
    aggregate: str = "max",
    raw_scores: bool = False,
    max_windows: int = DEFAULT_MAX_WINDOWS,
    batch_size: int = 256,
    score_actors: int | None = None,
    threads: int | None = None,
) -> Dataset:
    """Add ``score``, ``window_start``, ``window_end`` and ``error`` to ``ds`` (see the module).

    ``model`` is a ``ModelConfig`` whose folder is a reranker or a classifier (``ValueError`` at once
    for any other, and for an input column the job writes when ``ds``'s schema is known). Scores
    are ``CrossEncoder.predict``'s, activated as the folder says; ``raw_scores`` gives the logits.
    ``truncate`` cuts long pairs as ``predict`` does instead of reading windows; ``aggregate``
    (``max``, ``first``, ``mean``) makes a windowed document's score. Pool size and CPU actors'
    torch threads default from the resources free now, as ``embed_dataset``'s encoders.
    """
    model = check_score_options(model, query_column, document_column, aggregate, max_windows)
    schema = ds.schema(fetch_if_missing=False)
    if schema is not None:
        check_score_columns(schema.names)
    actors = score_actors or default_pool_sizes(model, 0.0)[1]
    if threads is None and model.num_gpus == 0:
        threads = default_encode_threads(actors)
    return ds.map_batches(
        ScoreStage,
        fn_constructor_kwargs={"model": model, "query_column": query_column, "document_column": document_column,
                               "truncate": truncate, "aggregate": aggregate, "activate": not raw_scores,
                               "max_windows": max_windows, "threads": threads},
        batch_format="pyarrow",
        batch_size=batch_size,
        **model_stage_options(model, actors),
    )


def run_score_job(
    source: str,
    output: str | Path,
    model: ModelConfig,
    *,
    query_column: str = "query",
    document_column: str = "text",
    id_column: str | None = None,
    truncate: bool = False,
    aggregate: str = "max",
    raw_scores: bool = False,
    max_windows: int = DEFAULT_MAX_WINDOWS,
    resume: bool = False,
    rows_per_part: int = 10_000,
    batch_size: int = 256,
    score_actors: int | None = None,
    show_progress: bool = True,
) -> BulkSummary:
    """Score every row of ``source`` into parquet parts under ``output`` (``bulk_job.run_job``: the
    input formats, ``resume`` per id and the refusals of the embedding job; see ``score_dataset``)."""
    model = check_score_options(model, query_column, document_column, aggregate, max_windows)

    def score(ds: Dataset) -> Dataset:
        return score_dataset(ds, model, query_column=query_column, document_column=document_column,
                             truncate=truncate, aggregate=aggregate, raw_scores=raw_scores, max_windows=max_windows,
                             batch_size=batch_size, score_actors=score_actors)

    return run_job(source, output, score, text_columns={query_column: "query", document_column: "document"},
                   check_columns=check_score_columns, id_column=id_column, resume=resume,
                   rows_per_part=rows_per_part, batch_size=batch_size, show_progress=show_progress,
                   description="scoring")
