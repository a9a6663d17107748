"""FoldedBatch: the wire format between the tokenizer and the encoder.

Plain numpy arrays only, so Ray's object store holds it zero-copy. The
segments of every input are ragged (each keeps its own length) and
concatenated into one id array; per-input metadata says how to unfold them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class FoldedBatch:
    """The folded segments of a batch of inputs.

    token_ids: every segment's ids (special tokens included), concatenated.
    segment_lengths: length of each segment (at most ``max_length``).
    segments_per_input: how many consecutive segments belong to each input.
    num_wordpieces: length of each input's unfolded sequence (one set of specials).
    num_start_tokens / num_end_tokens: specials the tokenizer puts around a segment.
    type_ids: aligned with ``token_ids``; ``None`` when all are zero.
    word_offsets / words_per_input: inclusive wordpiece span of each word in
        its input's unfolded sequence, ``(-1, -1)`` for a word with no wordpieces.
    wordpieces: each input's unfolded wordpiece strings, when asked for.
    prompt_lengths: per input, how many leading wordpieces of its unfolded sequence the prompt
        takes (start tokens included, as sentence-transformers counts them); ``None`` without prompts.
    tokenize_ms: how long tokenizing and folding took, for whoever reports it.
    chunk_spans / chunk_char_spans / chunks_per_input: for late chunking, each chunk's
        ``[start, end)`` wordpieces in its input's unfolded sequence and ``[start, end)``
        characters in its input text, and how many consecutive chunks belong to each input.
    """

    token_ids: np.ndarray
    segment_lengths: np.ndarray
    segments_per_input: np.ndarray
    num_wordpieces: np.ndarray
    num_start_tokens: int
    num_end_tokens: int
    type_ids: np.ndarray | None = None
    word_offsets: np.ndarray | None = None
    words_per_input: np.ndarray | None = None
    wordpieces: list[list[str]] | None = None
    prompt_lengths: np.ndarray | None = None
    chunk_spans: np.ndarray | None = None
    chunk_char_spans: np.ndarray | None = None
    chunks_per_input: np.ndarray | None = None
    tokenize_ms: float | None = None

    @property
    def num_inputs(self) -> int:
        return len(self.segments_per_input)

    @property
    def num_segments(self) -> int:
        return len(self.segment_lengths)

    @property
    def num_tokens(self) -> int:
        """Tokens the encoder computes for this batch (specials of every segment included)."""
        return int(self.token_ids.shape[0])

    @property
    def has_words(self) -> bool:
        return self.word_offsets is not None

    def segment_starts(self) -> np.ndarray:
        """Offset of each segment in ``token_ids``."""
        return np.concatenate(([0], np.cumsum(self.segment_lengths)[:-1])).astype(np.int64)

    def input_segment_starts(self) -> np.ndarray:
        """Index of each input's first segment."""
        return np.concatenate(([0], np.cumsum(self.segments_per_input)[:-1])).astype(np.int64)

    def word_starts(self) -> np.ndarray:
        """Index of each input's first word in ``word_offsets``."""
        if self.words_per_input is None:
            raise ValueError("this batch was not built from words")
        return np.concatenate(([0], np.cumsum(self.words_per_input)[:-1])).astype(np.int64)

    @property
    def has_chunks(self) -> bool:
        return self.chunk_spans is not None

    def chunk_table(self) -> list[np.ndarray] | None:
        """Per input, ``[num_chunks, 3]``: its chunks' start and end characters and wordpiece counts
        (``None`` for a batch without chunks)."""
        if not self.has_chunks:
            return None
        table = np.column_stack([self.chunk_char_spans, self.chunk_spans[:, 1] - self.chunk_spans[:, 0]])
        return np.split(table, np.cumsum(self.chunks_per_input)[:-1])

    def input_offsets(self, index: int) -> np.ndarray:
        """The word offsets of one input."""
        start = int(self.word_starts()[index])
        return self.word_offsets[start:start + int(self.words_per_input[index])]

    @classmethod
    def concat(cls, batches: Sequence["FoldedBatch"]) -> "FoldedBatch":
        """Join batches that share one tokenizer into one batch (inputs in order)."""
        if not batches:
            raise ValueError("no batches to concatenate")
        first = batches[0]
        if any((b.num_start_tokens, b.num_end_tokens) != (first.num_start_tokens, first.num_end_tokens)
               for b in batches):
            raise ValueError("batches come from tokenizers with different special tokens")
        if len(batches) == 1:
            return first
        with_pieces = all(b.wordpieces is not None for b in batches)
        return cls(
            token_ids=np.concatenate([b.token_ids for b in batches]),
            segment_lengths=np.concatenate([b.segment_lengths for b in batches]),
            segments_per_input=np.concatenate([b.segments_per_input for b in batches]),
            num_wordpieces=np.concatenate([b.num_wordpieces for b in batches]),
            num_start_tokens=first.num_start_tokens,
            num_end_tokens=first.num_end_tokens,
            type_ids=_joined(batches, "type_ids", lambda b: np.zeros_like(b.token_ids, dtype=np.int32)),
            word_offsets=_joined(batches, "word_offsets"),
            words_per_input=_joined(batches, "words_per_input"),
            wordpieces=[p for b in batches for p in b.wordpieces] if with_pieces else None,
            prompt_lengths=_joined(batches, "prompt_lengths", lambda b: np.zeros(b.num_inputs, dtype=np.int32)),
            chunk_spans=_joined(batches, "chunk_spans"),
            chunk_char_spans=_joined(batches, "chunk_char_spans"),
            chunks_per_input=_joined(batches, "chunks_per_input"),
        )


def _joined(batches: Sequence[FoldedBatch], name: str,
            filler: Callable[[FoldedBatch], np.ndarray] | None = None) -> np.ndarray | None:
    """One field of every batch, concatenated. A batch without it gets ``filler``'s array (the
    field's neutral value), or without a filler the joined batch has none either."""
    parts = [getattr(batch, name) for batch in batches]
    if all(part is None for part in parts) or (filler is None and any(part is None for part in parts)):
        return None
    return np.concatenate([part if part is not None else filler(batch) for part, batch in zip(parts, batches)])
