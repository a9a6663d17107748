"""Pooling wordpiece vectors into one vector per word (AllenNLP's mismatched embedder, BertEmbedder offsets)."""

from __future__ import annotations

from typing import Literal, get_args

import torch

SubTokenMode = Literal["avg", "first", "last"]
SUB_TOKEN_MODES: tuple[str, ...] = get_args(SubTokenMode)


def pool_spans(embeddings: torch.Tensor, offsets: torch.Tensor, mode: SubTokenMode = "avg") -> torch.Tensor:
    """Pool inclusive wordpiece spans ``[batch, words, 2]`` of ``[batch, wordpieces, dim]``.

    ``avg`` averages a word's wordpieces, ``first``/``last`` pick one. A span of
    ``(-1, -1)`` (a word with no wordpieces) gives zeros, and finite gradients.
    """
    if mode not in SUB_TOKEN_MODES:
        raise ValueError(f"Do not recognise sub_token_mode {mode!r}; expected one of {SUB_TOKEN_MODES}")
    batch_size, sequence_length, _ = embeddings.shape
    starts, ends = offsets[..., 0], offsets[..., 1]
    valid = (starts >= 0) & (ends >= starts) & (ends < sequence_length)
    rows = torch.arange(batch_size, device=embeddings.device).unsqueeze(-1)
    if mode != "avg":
        index = (starts if mode == "first" else ends).clamp(0, max(sequence_length - 1, 0))
        return embeddings[rows, index] * valid.unsqueeze(-1).to(embeddings.dtype)
    widths = (ends - starts).clamp_min(0)
    max_width = int(widths.max()) + 1 if widths.numel() else 1
    span_range = torch.arange(max_width, device=embeddings.device)
    raw_index = starts.unsqueeze(-1) + span_range
    span_mask = (span_range <= widths.unsqueeze(-1)) & valid.unsqueeze(-1)
    index = raw_index.clamp(0, max(sequence_length - 1, 0))
    spans = embeddings[rows.unsqueeze(-1), index] * span_mask.unsqueeze(-1).to(embeddings.dtype)
    counts = span_mask.sum(-1, keepdim=True).clamp_min(1).to(embeddings.dtype)
    return spans.sum(2) / counts
