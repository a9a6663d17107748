"""Folding long wordpiece sequences into segments and unfolding encoder output.

All of the project's fold/unfold logic lives here, in its three forms:
- ragged (numpy, the serving path): ``fold_pieces`` and ``unfold_index``;
- padded (torch, AllenNLP's ``PretrainedTransformerEmbedder`` layout):
  ``fold_padded`` and ``unfold_padded``;
- ``BertEmbedder``'s sliding windows: ``bert_window_indices``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from embedder.folded_batch import FoldedBatch
from embedder.special_tokens import SpecialTokens


def fold_pieces(
    pieces: list[int],
    piece_type_ids: list[int] | None,
    special: SpecialTokens,
    max_length: int,
) -> tuple[list[list[int]], list[list[int]]]:
    """Cut wordpieces (no specials) into chunks of ``max_length - specials``, and wrap each
    chunk in the tokenizer's own start and end tokens (type ids follow the same rule)."""
    chunk = max_length - special.num_added
    if chunk < 1:
        raise ValueError(f"max_length {max_length} leaves no room beside {special.num_added} special tokens")
    if piece_type_ids is None:
        piece_type_ids = [0] * len(pieces)
    starts = range(0, max(len(pieces), 1), chunk)
    segments = [list(special.start_ids) + pieces[i:i + chunk] + list(special.end_ids) for i in starts]
    type_ids = [
        list(special.start_type_ids) + piece_type_ids[i:i + chunk] + list(special.end_type_ids)
        for i in starts
    ]
    return segments, type_ids


def _segment_keep_ranges(batch: FoldedBatch) -> tuple[np.ndarray, np.ndarray]:
    """Per segment, the [lo, hi) positions that survive unfolding.

    The first segment keeps its start tokens, the last its end tokens; every
    inner start/end token is dropped.
    """
    lengths = batch.segment_lengths.astype(np.int64)
    first = np.zeros(batch.num_segments, dtype=bool)
    first[batch.input_segment_starts()] = True
    last = np.zeros(batch.num_segments, dtype=bool)
    last[np.cumsum(batch.segments_per_input) - 1] = True
    lo = np.where(first, 0, batch.num_start_tokens)
    hi = lengths - np.where(last, 0, batch.num_end_tokens)
    return lo, hi


def unfold_index(batch: FoldedBatch) -> np.ndarray:
    """Positions in ``batch.token_ids`` that make up the inputs' unfolded sequences, in order.

    ``flat_output[unfold_index(batch)]`` gives every input's one-vector-per-wordpiece
    sequence, the inputs concatenated (split them by ``batch.num_wordpieces``).
    """
    lo, hi = _segment_keep_ranges(batch)
    counts = hi - lo
    total = int(counts.sum())
    first_position = batch.segment_starts() + lo
    run_starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    return np.repeat(first_position - run_starts, counts) + np.arange(total, dtype=np.int64)


def fold_padded(
    token_ids: torch.Tensor,
    segment_concat_mask: torch.Tensor,
    type_ids: torch.Tensor | None,
    max_length: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Fold ``[batch, num_segment_concat_wordpieces]`` into ``[batch * num_segments, max_length]``."""
    num_segments = math.ceil(token_ids.size(1) / max_length)
    length_to_pad = num_segments * max_length - token_ids.size(1)

    def fold(tensor: torch.Tensor) -> torch.Tensor:
        return F.pad(tensor, [0, length_to_pad], value=0).reshape(-1, max_length)

    return fold(token_ids), fold(segment_concat_mask), None if type_ids is None else fold(type_ids)


def unfold_padded(
    embeddings: torch.Tensor,
    segment_concat_mask: torch.Tensor,
    batch_size: int,
    num_start_tokens: int,
    num_end_tokens: int,
) -> torch.Tensor:
    """Undo ``fold_padded`` on the encoder output, dropping inner specials.

    ``[batch * num_segments, max_length, dim]`` -> ``[batch, num_wordpieces, dim]``,
    positions past an input's own length are zero.
    """
    max_length, dim = embeddings.size(1), embeddings.size(2)
    embeddings = embeddings.reshape(batch_size, -1, dim)
    mask = segment_concat_mask.reshape(batch_size, -1).bool()
    seq_lengths = mask.sum(-1)
    positions = torch.arange(mask.size(1), device=mask.device)
    if not (mask == (positions < seq_lengths.unsqueeze(1))).all():
        raise ValueError("Long sequence splitting only supports masks with all 1s preceding all 0s.")
    segment = positions // max_length
    offset = positions % max_length
    last_segment = ((seq_lengths - 1).clamp_min(0) // max_length).unsqueeze(1)
    keep = (
        mask
        & ((segment == 0) | (offset >= num_start_tokens)).unsqueeze(0)
        & ((segment.unsqueeze(0) == last_segment) | (offset < max_length - num_end_tokens).unsqueeze(0))
    )
    num_wordpieces = keep.sum(-1)
    destination = keep.cumsum(-1) - 1
    rows, columns = keep.nonzero(as_tuple=True)
    output = embeddings.new_zeros(batch_size, int(num_wordpieces.max()), dim)
    output[rows, destination[rows, columns]] = embeddings[rows, columns]
    return output


def bert_window_indices(full_seq_len: int, max_pieces: int, num_start_tokens: int, num_end_tokens: int) -> list[int]:
    """``BertEmbedder``'s choice of positions from concatenated windows of ``max_pieces``:
    the centre of each window, plus the leftover start and final edges."""
    stride = (max_pieces - num_start_tokens - num_end_tokens) // 2
    stride_offset = stride // 2 + num_start_tokens
    first_window = list(range(stride_offset))
    max_context_windows = [
        i for i in range(full_seq_len) if stride_offset - 1 < i % max_pieces < stride_offset + stride
    ]
    lookback = max_pieces if full_seq_len % max_pieces == 0 else full_seq_len % max_pieces
    final_window_start = full_seq_len - lookback + stride_offset + stride
    final_window = list(range(final_window_start, full_seq_len))
    return first_window + max_context_windows + final_window
