"""Text, sentence pairs or pre-split words -> wordpiece ids, folded for long inputs.

``PretrainedTransformerIndexer`` plays AllenNLP's ``PretrainedTransformerIndexer``
and ``PretrainedTransformerMismatchedIndexer``: ``fold`` gives the ragged
numpy ``FoldedBatch`` of the serving path, calling the indexer gives AllenNLP's
padded torch layout for use inside a model.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch

from embedder.cache import get_tokenizer
from embedder.chunking import DEFAULT_CHUNK_SIZE, TooManyChunksError, check_chunking, plan_chunks, spans_to_pieces
from embedder.folded_batch import FoldedBatch
from embedder.folding import fold_pieces
from embedder.shared_tokenizer import PROMPT_CACHE_SIZE
from embedder.special_tokens import SpecialTokens

TruncationDirection = Literal["right", "left"]
TRUNCATION_DIRECTIONS: tuple[str, ...] = get_args(TruncationDirection)


@dataclass
class _Sequence:
    """One input before folding: its wordpieces without specials, and optionally
    the tokenizer's own encoding with specials (kept as is when it fits)."""

    pieces: list[int]
    piece_type_ids: list[int] | None = None
    full_ids: list[int] | None = None
    full_type_ids: list[int] | None = None
    word_offsets: list[tuple[int, int]] | None = None


class PretrainedTransformerIndexer:
    """Tokenizes and folds inputs for a transformer.

    ``max_length`` (optional) folds an input longer than it into segments of at
    most ``max_length`` wordpieces each, every segment with the tokenizer's specials.
    ``vocab_size`` (optional): the rows of the model's embedding matrix, which token ids given
    as such must index (default: the tokenizer's size).
    """

    def __init__(
        self,
        model_name: str,
        max_length: int | None = None,
        tokenizer_kwargs: dict[str, Any] | None = None,
        vocab_size: int | None = None,
    ) -> None:
        self.model_name = str(model_name)
        self.max_length = max_length
        self.tokenizer = get_tokenizer(model_name, **(tokenizer_kwargs or {}))
        self.vocab_size = vocab_size or len(self.tokenizer)
        self.special = SpecialTokens.from_tokenizer(self.tokenizer)
        if max_length is not None and max_length <= self.special.num_added:
            raise ValueError(f"max_length {max_length} leaves no room beside "
                             f"{self.special.num_added} special tokens")
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        #: wordpieces per prompt: a request may bring any prompt, so the cache is bounded
        self._prompt_lengths = functools.lru_cache(maxsize=PROMPT_CACHE_SIZE)(self._count_prompt)

    def __call__(
        self,
        texts: Sequence[str] | None = None,
        *,
        pairs: Sequence[tuple[str, str]] | None = None,
        words: Sequence[Sequence[str]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """AllenNLP's padded tensors: ``token_ids``, ``mask``, ``type_ids``, plus
        ``segment_concat_mask`` with ``max_length``, and ``offsets`` and
        ``wordpiece_mask`` for words (then ``mask`` is the word mask)."""
        return to_padded_tensors(self.fold(texts, pairs=pairs, words=words), self.pad_token_id,
                                 folded=self.max_length is not None)

    def fold(
        self,
        texts: Sequence[str] | None = None,
        *,
        pairs: Sequence[tuple[str, str]] | None = None,
        words: Sequence[Sequence[str]] | None = None,
        token_ids: Sequence[Sequence[int]] | None = None,
        truncate: bool = False,
        truncation_direction: TruncationDirection | None = None,
        prompt: str | None = None,
        return_wordpieces: bool = False,
    ) -> FoldedBatch:
        """Tokenize exactly one of ``texts``, ``pairs``, ``words`` or ``token_ids`` into a ``FoldedBatch``.

        Long inputs are folded; with ``truncate`` only ``max_length`` wordpieces are kept: the
        first ones, or with ``truncation_direction="left"`` the last ones (default: the
        tokenizer's ``truncation_side``). A pair is truncated ``longest_first`` by the tokenizer
        itself, as sentence-transformers does it (each text keeps a share, the longer one cut
        first), never by cutting the joined sequence. ``token_ids`` are the model's own ids, as its
        tokenizer gives them (specials included): used as they are when they fit, else folded like
        text (their leading start and trailing end tokens, when present, are the specials). A ``prompt`` is put before each text (before the
        first text of a pair, as wordpieces before pre-split words) and tokenized with it,
        as sentence-transformers does; the batch records how many wordpieces it takes.
        """
        if sum(x is not None for x in (texts, pairs, words, token_ids)) != 1:
            raise ValueError("give exactly one of texts, pairs, words or token_ids")
        direction = truncation_direction or self.tokenizer.truncation_side
        if direction not in TRUNCATION_DIRECTIONS:
            raise ValueError(f"truncation_direction must be one of {TRUNCATION_DIRECTIONS}, not {direction!r}")
        prompt = prompt or None
        if prompt is not None and not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, not {type(prompt).__name__}")
        if texts is not None:
            texts = _check_strings(texts, "texts")
            sequences = self._from_texts(texts if prompt is None else [prompt + text for text in texts])
        elif pairs is not None:
            sequences = self._from_pairs(pairs, prompt, direction if truncate else None)
        elif words is not None:
            sequences = self._from_words(words, prompt)
        else:
            if prompt is not None:
                raise ValueError("a prompt is text: it cannot go before token ids")
            sequences = self._from_ids(token_ids)
        batch = self._assemble(sequences, truncate=truncate, keep_last=direction == "left",
                               return_wordpieces=return_wordpieces)
        if prompt is not None:
            batch.prompt_lengths = np.full(batch.num_inputs, self.prompt_length(prompt), dtype=np.int32)
        return batch

    def fold_chunks(
        self,
        texts: Sequence[str],
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        chunk_overlap: int = 0,
        spans: Sequence[Sequence[tuple[int, int]]] | None = None,
        prompt: str | None = None,
        return_wordpieces: bool = False,
        max_chunks: int | None = None,
    ) -> FoldedBatch:
        """Documents for late chunking: each folded whole, with its chunks (``chunk_spans`` and
        ``chunk_char_spans``): windows of whole words of at most ``chunk_size`` wordpieces
        (``embedder.chunking.plan_chunks``; words as the tokenizer's pre-tokenizer splits
        them), or the caller's character ``spans`` per document. A ``prompt``'s wordpieces
        come before the document's, outside every chunk. A document without wordpieces
        (zero-width characters only) has no chunks. More than ``max_chunks`` chunks in all is a
        ``TooManyChunksError``, raised before the chunks are laid out."""
        texts = _check_strings(texts, "texts")
        if spans is None:
            check_chunking(chunk_size, chunk_overlap)
        elif isinstance(spans, (str, bytes)) or len(spans) != len(texts):
            raise ValueError(f"spans must hold one list of [start, end) spans per document ({len(texts)})")
        elif max_chunks is not None and sum(len(s) for s in spans if isinstance(s, (list, tuple))) > max_chunks:
            raise TooManyChunksError(max_chunks)
        if not self.tokenizer.is_fast:
            raise ValueError("late chunking needs a fast tokenizer (for character offsets)")
        encoded = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False,
                                 return_attention_mask=False, return_token_type_ids=False)
        prompt_pieces = [] if not prompt else self.tokenizer(prompt, add_special_tokens=False,
                                                             verbose=False)["input_ids"]
        shift = self.special.num_start + len(prompt_pieces)
        sequences, windows, characters, counts = [], [], [], []
        for index, text in enumerate(texts):
            ids, offsets = encoded["input_ids"][index], encoded["offset_mapping"][index]
            if spans is None:
                word_ids = encoded.word_ids(index)
                starts = [p for p in range(len(ids)) if p == 0 or word_ids[p] != word_ids[p - 1]]
                try:
                    pieces = plan_chunks(starts, len(ids), chunk_size, chunk_overlap,
                                         None if max_chunks is None else max_chunks - len(windows))
                except TooManyChunksError:
                    raise TooManyChunksError(max_chunks) from None
                chars = [(offsets[start][0], offsets[end - 1][1]) for start, end in pieces]
            else:
                if isinstance(spans[index], (str, bytes)) or not spans[index]:
                    raise ValueError(f"spans[{index}] must be a non-empty list of [start, end) spans")
                try:
                    pieces = spans_to_pieces(offsets, spans[index], len(text))
                except ValueError as error:
                    raise ValueError(f"document {index}: {error}") from None
                chars = [tuple(span) for span in spans[index]]
            sequences.append(_Sequence(pieces=prompt_pieces + ids))
            windows.extend((start + shift, end + shift) for start, end in pieces)
            characters.extend(chars)
            counts.append(len(pieces))
        batch = self._assemble(sequences, truncate=False, keep_last=False, return_wordpieces=return_wordpieces)
        batch.chunk_spans = np.array(windows, dtype=np.int32).reshape(-1, 2)
        batch.chunk_char_spans = np.array(characters, dtype=np.int32).reshape(-1, 2)
        batch.chunks_per_input = np.array(counts, dtype=np.int32)
        return batch

    def prompt_length(self, prompt: str) -> int:
        """Leading wordpieces a prompt takes in a sequence, counted as sentence-transformers counts
        them: the prompt tokenized alone with its specials, less a trailing special token."""
        return self._prompt_lengths(prompt)

    def _count_prompt(self, prompt: str) -> int:
        ids = self.tokenizer(prompt, add_special_tokens=True, verbose=False)["input_ids"]
        return len(ids) - int(bool(ids) and ids[-1] in set(self.tokenizer.all_special_ids))

    def _from_texts(self, texts: list[str]) -> list[_Sequence]:
        encoded = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False,
                                 return_token_type_ids=False)["input_ids"]
        return [_Sequence(pieces=ids) for ids in encoded]

    def _from_pairs(self, pairs: Sequence[tuple[str, str]], prompt: str | None,
                    truncation_side: str | None) -> list[_Sequence]:
        """Pairs with the tokenizer's pair template; ``truncation_side`` (with a ``max_length``):
        truncated ``longest_first`` on that side."""
        if isinstance(pairs, (str, bytes)) or not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs):
            raise TypeError("pairs must be a list of (text, text) pairs")
        firsts = _check_strings([p[0] for p in pairs], "pairs")
        if prompt is not None:
            firsts = [prompt + first for first in firsts]
        seconds = _check_strings([p[1] for p in pairs], "pairs")
        tokenizer, cut = self.tokenizer, {}
        if truncation_side is not None and self.max_length is not None:
            tokenizer = self.tokenizer.with_truncation_side(truncation_side)
            cut = {"truncation": "longest_first", "max_length": self.max_length}
        encoded = tokenizer(firsts, seconds, add_special_tokens=True, return_attention_mask=False, verbose=False,
                            return_token_type_ids=True, **cut)
        type_lists = encoded.get("token_type_ids") or [[0] * len(ids) for ids in encoded["input_ids"]]
        start, end = self.special.num_start, self.special.num_end
        return [
            _Sequence(pieces=ids[start:len(ids) - end], piece_type_ids=types[start:len(types) - end],
                      full_ids=ids, full_type_ids=types)
            for ids, types in zip(encoded["input_ids"], type_lists)
        ]

    def _from_words(self, words: Sequence[Sequence[str]], prompt: str | None) -> list[_Sequence]:
        if isinstance(words, (str, bytes)) or not all(
            isinstance(ws, (list, tuple)) and not isinstance(ws, str) for ws in words
        ):
            raise TypeError("words must be a list of lists of strings")
        flat = _check_strings([w for ws in words for w in ws], "words")
        encoded = self.tokenizer(flat, add_special_tokens=False, return_attention_mask=False, verbose=False,
                                 return_token_type_ids=False)["input_ids"] if flat else []
        prompt_pieces = [] if prompt is None else self.tokenizer(
            prompt, add_special_tokens=False, verbose=False)["input_ids"]
        sequences, position = [], 0
        for ws in words:
            pieces, offsets = list(prompt_pieces), []
            for word_ids in encoded[position:position + len(ws)]:
                if word_ids:
                    offsets.append((len(pieces), len(pieces) + len(word_ids) - 1))
                    pieces.extend(word_ids)
                else:
                    offsets.append((-1, -1))
            position += len(ws)
            sequences.append(_Sequence(pieces=pieces, word_offsets=offsets))
        return sequences

    def _from_ids(self, token_ids: Sequence[Sequence[int]]) -> list[_Sequence]:
        vocabulary = self.vocab_size
        start, end = list(self.special.start_ids), list(self.special.end_ids)
        sequences = []
        for index, ids in enumerate(token_ids):
            ids = [int(i) for i in ids]
            if not ids:
                raise ValueError(f"token_ids[{index}] is empty")
            if min(ids) < 0 or max(ids) >= vocabulary:
                raise ValueError(f"token_ids[{index}] holds ids outside the model's vocabulary (0 to {vocabulary - 1})")
            first = len(start) if start and ids[:len(start)] == start else 0
            last = len(ids) - len(end) if end and len(ids) - first >= len(end) and ids[-len(end):] == end else len(ids)
            sequences.append(_Sequence(pieces=ids[first:last], full_ids=ids, full_type_ids=[0] * len(ids)))
        return sequences

    def _assemble(self, sequences: list[_Sequence], *, truncate: bool, keep_last: bool,
                  return_wordpieces: bool) -> FoldedBatch:
        special = self.special
        chunk = None if self.max_length is None else self.max_length - special.num_added
        segment_ids: list[list[int]] = []
        segment_types: list[list[int]] = []
        segments_per_input, num_wordpieces, offsets, unfolded = [], [], [], []
        for index, seq in enumerate(sequences):
            first_kept, kept = 0, seq.pieces
            if chunk is not None and truncate and len(seq.pieces) > chunk:
                first_kept = len(seq.pieces) - chunk if keep_last else 0
                kept = seq.pieces[first_kept:first_kept + chunk]
            kept_types = None if not seq.piece_type_ids else seq.piece_type_ids[first_kept:first_kept + len(kept)]
            full_fits = seq.full_ids is not None and (self.max_length is None or len(seq.full_ids) <= self.max_length)
            if full_fits:
                segs, types = [seq.full_ids], [seq.full_type_ids]
                wordpiece_ids = seq.full_ids
            else:
                if chunk is None or len(kept) <= chunk:
                    segs = [list(special.start_ids) + kept + list(special.end_ids)]
                    types = [list(special.start_type_ids) + (kept_types or [0] * len(kept))
                             + list(special.end_type_ids)]
                else:
                    segs, types = fold_pieces(kept, kept_types, special, self.max_length)
                wordpiece_ids = list(special.start_ids) + kept + list(special.end_ids)
            if not wordpiece_ids:
                raise ValueError(f"input {index} has no wordpieces")
            segment_ids.extend(segs)
            segment_types.extend(types)
            segments_per_input.append(len(segs))
            num_wordpieces.append(len(wordpiece_ids))
            if seq.word_offsets is not None:
                offsets.extend(_shift_offsets(seq.word_offsets, special.num_start, first_kept, len(kept)))
            if return_wordpieces:
                unfolded.append(self.tokenizer.convert_ids_to_tokens(wordpiece_ids))
        flat_types = np.fromiter((t for ts in segment_types for t in ts), dtype=np.int32)
        with_words = sequences and sequences[0].word_offsets is not None
        return FoldedBatch(
            token_ids=np.fromiter((i for ids in segment_ids for i in ids), dtype=np.int32),
            segment_lengths=np.array([len(s) for s in segment_ids], dtype=np.int32),
            segments_per_input=np.array(segments_per_input, dtype=np.int32),
            num_wordpieces=np.array(num_wordpieces, dtype=np.int32),
            num_start_tokens=special.num_start,
            num_end_tokens=special.num_end,
            type_ids=flat_types if flat_types.any() else None,
            word_offsets=np.array(offsets, dtype=np.int32).reshape(-1, 2) if with_words else None,
            words_per_input=np.array([len(s.word_offsets) for s in sequences], dtype=np.int32)
            if with_words else None,
            wordpieces=unfolded if return_wordpieces else None,
        )


def _check_strings(values: Sequence[Any], name: str) -> list[str]:
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a list of strings, not a single string")
    values = list(values)
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise TypeError(f"{name}[{index}] is {type(value).__name__}, expected str")
    return values


def _shift_offsets(offsets: list[tuple[int, int]], shift: int, first_kept: int,
                   num_kept: int) -> list[tuple[int, int]]:
    """Move word spans into unfolded-sequence coordinates, where wordpieces ``first_kept`` to
    ``first_kept + num_kept`` survived truncation; words cut off entirely get (-1, -1)."""
    shifted = []
    last_kept = first_kept + num_kept - 1
    for start, end in offsets:
        if start < 0 or start > last_kept or end < first_kept:
            shifted.append((-1, -1))
        else:
            shifted.append((max(start, first_kept) - first_kept + shift, min(end, last_kept) - first_kept + shift))
    return shifted


def to_padded_tensors(batch: FoldedBatch, pad_token_id: int, *, folded: bool) -> dict[str, torch.Tensor]:
    """Lay a ``FoldedBatch`` out as AllenNLP's padded tensors (see ``PretrainedTransformerIndexer``)."""
    segment_starts = batch.segment_starts()
    input_first_segment = batch.input_segment_starts()
    concat_lengths = np.add.reduceat(batch.segment_lengths, input_first_segment) if batch.num_inputs else []
    width = int(max(concat_lengths, default=0))
    token_ids = torch.full((batch.num_inputs, width), pad_token_id, dtype=torch.long)
    type_ids = torch.zeros((batch.num_inputs, width), dtype=torch.long)
    segment_concat_mask = torch.zeros((batch.num_inputs, width), dtype=torch.bool)
    for row, (first, length) in enumerate(zip(input_first_segment, concat_lengths)):
        begin = segment_starts[first]
        token_ids[row, :length] = torch.from_numpy(batch.token_ids[begin:begin + length].astype(np.int64))
        if batch.type_ids is not None:
            type_ids[row, :length] = torch.from_numpy(batch.type_ids[begin:begin + length].astype(np.int64))
        segment_concat_mask[row, :length] = True
    wordpiece_lengths = torch.from_numpy(batch.num_wordpieces.astype(np.int64))
    wordpiece_mask = (torch.arange(int(batch.num_wordpieces.max(initial=0)))[None, :]
                      < wordpiece_lengths[:, None])
    output = {"token_ids": token_ids, "type_ids": type_ids}
    if folded:
        output["segment_concat_mask"] = segment_concat_mask
    if not batch.has_words:
        output["mask"] = wordpiece_mask
        return output
    num_words = torch.from_numpy(batch.words_per_input.astype(np.int64))
    offsets = torch.zeros((batch.num_inputs, int(batch.words_per_input.max(initial=0)), 2), dtype=torch.long)
    for row, start in enumerate(batch.word_starts()):
        count = int(batch.words_per_input[row])
        offsets[row, :count] = torch.from_numpy(batch.word_offsets[start:start + count].astype(np.int64))
    output["offsets"] = offsets
    output["wordpiece_mask"] = wordpiece_mask
    output["mask"] = torch.arange(offsets.size(1))[None, :] < num_words[:, None]
    return output
