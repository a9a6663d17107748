"""Windows of a long document beside its query, for a cross-encoder that reads both at once.

A pair longer than the model's length keeps its query whole and cuts the document's
wordpieces into windows of whole words (``embedder.chunking.plan_chunks``) that fit beside
the query and the pair template's special tokens. Each window is given back as a character
span of the document, so that the window is scored as the text ``document[start:end]``: cut
at word starts, that text tokenizes to the same wordpieces (the pre-tokenizer splits there
anyway). The document's score is then the maximum over its windows (MaxP, Dai & Callan 2019),
the first window's, or their mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np

from embedder.chunking import plan_chunks

#: How a document's window scores become its score: ``max`` (MaxP), ``first`` (FirstP), ``mean``.
Aggregate = Literal["max", "first", "mean"]
AGGREGATES: tuple[str, ...] = get_args(Aggregate)


class InputTooLongError(ValueError):
    """An input the model cannot read as asked: a query that leaves a long document too little room
    beside it, or a single text over ``max_length`` that may not be truncated."""


def check_aggregate(aggregate: str) -> None:
    """``ValueError`` unless ``aggregate`` is one of ``AGGREGATES``."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, not {aggregate!r}")


def window_budget(max_length: int, num_special: int, query_length: int, what: str = "the query") -> int:
    """Document wordpieces that fit beside a query of ``query_length`` wordpieces and the pair's
    ``num_special`` special tokens. A query longer than half of ``max_length`` is an
    ``InputTooLongError`` (it would leave the document too little room); ``what`` names it (an LLM
    reranker counts the query with its prompt template)."""
    if query_length > max_length // 2:
        raise InputTooLongError(f"{what} has {query_length} tokens, more than half of max_length {max_length}: "
                         f"a long document cannot be cut into windows beside it (shorten the query, or "
                         f"pass truncate=True)")
    budget = max_length - num_special - query_length
    if budget < 1:
        raise ValueError(f"max_length {max_length} leaves no room for a document beside a query of {query_length} "
                         f"tokens and {num_special} special tokens")
    return budget


def default_overlap(budget: int) -> int:
    """The overlap of consecutive windows when the caller sets none: a quarter of the window."""
    return budget // 4


def check_overlap(window_overlap: int, budget: int) -> None:
    """``ValueError`` unless ``0 <= window_overlap < budget``."""
    if not isinstance(window_overlap, int) or isinstance(window_overlap, bool) or not 0 <= window_overlap < budget:
        raise ValueError(f"window_overlap must be an integer from 0 to {budget - 1} (the window holds {budget} "
                         f"document tokens beside this query), not {window_overlap!r}")


def word_starts(word_ids: Sequence[int | None]) -> list[int]:
    """The wordpieces that start a word: the first, and each whose word differs from the one before."""
    return [p for p in range(len(word_ids)) if p == 0 or word_ids[p] != word_ids[p - 1]]


def window_spans(offsets: Sequence[tuple[int, int]], word_ids: Sequence[int | None], budget: int,
                 window_overlap: int, max_windows: int | None = None) -> list[tuple[int, int]]:
    """The character spans ``[start, end)`` of a document's windows, from its wordpieces'
    character ``offsets`` and ``word_ids`` (a fast tokenizer's, without special tokens): at most
    ``budget`` wordpieces each, cut at word starts, consecutive ones sharing about
    ``window_overlap`` wordpieces. More than ``max_windows`` is a ``TooManyChunksError``."""
    pieces = plan_chunks(word_starts(word_ids), len(word_ids), budget, window_overlap, max_windows)
    return [(int(offsets[start][0]), int(offsets[end - 1][1])) for start, end in pieces]


def aggregate_windows(scores: np.ndarray, spans: Sequence[tuple[int, int]],
                      aggregate: Aggregate) -> tuple[np.ndarray, tuple[int, int]]:
    """A document's score from its windows' ``scores`` (``[windows]`` or ``[windows, labels]``) and
    the span it comes from: the best window's for ``max``, the first's for ``first``, the span
    of all windows for ``mean``."""
    check_aggregate(aggregate)
    if aggregate == "first" or len(spans) == 1:
        return scores[0], tuple(spans[0])
    if aggregate == "mean":
        return scores.mean(axis=0, dtype=np.float64).astype(scores.dtype), (spans[0][0], spans[-1][1])
    if scores.ndim > 1:
        raise ValueError("the maximum over windows needs one score per window, not one per label")
    best = int(np.argmax(scores))
    return scores[best], tuple(spans[best])
