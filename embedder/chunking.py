"""Late chunking: a document's chunks, cut at word boundaries, each pooled from the wordpiece
vectors of the whole document's encoding (Günther et al., 2024), so every chunk keeps its
document's context.

``plan_chunks`` cuts a document's wordpieces into windows of whole words;
``spans_to_pieces`` maps a caller's character spans to wordpieces; ``chunk_vectors``
pools them from wordpiece vectors (with a model's ``SentenceHead``: mean pooling,
then its Dense / LayerNorm / Normalize modules).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np
import torch

from embedder.devices import host_to_device
from embedder.sentence_head import SentenceHead

DEFAULT_CHUNK_SIZE = 128
#: ``document``: late chunking (each chunk pooled from its whole document); ``chunk``: each chunk alone.
ChunkContext = Literal["document", "chunk"]
CHUNK_CONTEXTS: tuple[str, ...] = get_args(ChunkContext)


class TooManyChunksError(ValueError):
    """The documents would give more chunks than the caller allows (``limit``)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the documents give more than {limit} chunks")
        self.limit = limit


def check_chunking(chunk_size: int, chunk_overlap: int) -> None:
    """``ValueError`` unless ``chunk_size >= 1`` and ``0 <= chunk_overlap < chunk_size``."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer of at least 1, not {chunk_size!r}")
    if not isinstance(chunk_overlap, int) or isinstance(chunk_overlap, bool) or not 0 <= chunk_overlap < chunk_size:
        raise ValueError(f"chunk_overlap must be an integer from 0 to chunk_size - 1 ({chunk_size - 1}), "
                         f"not {chunk_overlap!r}")


def plan_chunks(word_starts: Sequence[int], num_pieces: int, chunk_size: int = DEFAULT_CHUNK_SIZE,
                chunk_overlap: int = 0, max_chunks: int | None = None) -> list[tuple[int, int]]:
    """``[start, end)`` wordpiece windows covering ``num_pieces`` wordpieces, cut only where a word
    starts (``word_starts``, ascending, the first 0).

    A window holds as many whole words as fit in ``chunk_size`` wordpieces (a single longer word
    is a window of its own); the next one starts ``chunk_size - chunk_overlap`` wordpieces after
    it, moved back to the word start at or before that point (but always forward), so with no
    overlap the windows tile the document. Past ``max_chunks`` windows, ``TooManyChunksError``
    (planning stops there: a large overlap cannot make it loop for long).
    """
    check_chunking(chunk_size, chunk_overlap)
    if num_pieces == 0:
        return []
    boundaries = np.asarray([*word_starts, num_pieces], dtype=np.int64)
    if boundaries[0] != 0 or np.any(np.diff(boundaries) <= 0):
        raise ValueError("word_starts must rise strictly from 0 and stay below num_pieces")
    stride = chunk_size - chunk_overlap
    windows = []
    start = 0
    while True:
        # the last boundary at or before start + chunk_size ends the window (at least one word)
        end_index = int(np.searchsorted(boundaries, start + chunk_size, side="right")) - 1
        end = int(boundaries[end_index])
        if end <= start:
            end = int(boundaries[np.searchsorted(boundaries, start, side="right")])
        if max_chunks is not None and len(windows) >= max_chunks:
            raise TooManyChunksError(max_chunks)
        windows.append((start, end))
        if end >= num_pieces:
            return windows
        next_index = int(np.searchsorted(boundaries, start + stride, side="right")) - 1
        next_start = int(boundaries[next_index])
        start = next_start if next_start > start else int(boundaries[np.searchsorted(boundaries, start,
                                                                                     side="right")])


def spans_to_pieces(piece_offsets: np.ndarray, spans: Sequence[tuple[int, int]],
                    text_length: int) -> list[tuple[int, int]]:
    """The ``[first, end)`` wordpieces each character span ``[start, end)`` overlaps, given each
    wordpiece's character offsets. ``ValueError`` for a span outside the text, empty, or
    holding no wordpiece (only spaces)."""
    piece_offsets = np.asarray(piece_offsets, dtype=np.int64).reshape(-1, 2)
    pieces = []
    for number, span in enumerate(spans):
        if not (isinstance(span, (list, tuple)) and len(span) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in span)):
            raise ValueError(f"span {number} must be a pair of integers [start, end), not {span!r}")
        start, end = span
        if not 0 <= start < end <= text_length:
            raise ValueError(f"span {number} [{start}, {end}) must be non-empty and inside the document "
                             f"(0 to {text_length})")
        inside = np.flatnonzero((piece_offsets[:, 0] < end) & (piece_offsets[:, 1] > start))
        if inside.size == 0:
            raise ValueError(f"span {number} [{start}, {end}) holds no token (only spaces)")
        pieces.append((int(inside[0]), int(inside[-1]) + 1))
    return pieces


def chunk_vectors(wordpiece_vectors: torch.Tensor, spans: np.ndarray | Sequence[tuple[int, int]],
                  head: SentenceHead | None = None, normalize: bool | None = None) -> torch.Tensor:
    """``[num_chunks, dim]``: the mean of each ``[start, end)`` run of ``[length, dim]`` wordpiece
    vectors, then ``head``'s modules after pooling (default: none); ``normalize`` as for
    ``SentenceHead``."""
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    lengths = spans[:, 1] - spans[:, 0]
    if np.any(lengths <= 0) or (spans.size and (spans.min() < 0 or spans.max() > wordpiece_vectors.size(0))):
        raise ValueError("chunk spans must be non-empty and inside the sequence")
    rows = np.repeat(spans[:, 0] - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths) + np.arange(lengths.sum())
    head = head or SentenceHead(wordpiece_vectors.size(-1))
    index = host_to_device(rows, wordpiece_vectors.device)
    return head(wordpiece_vectors[index], torch.from_numpy(lengths), pooling="mean", normalize=normalize)
