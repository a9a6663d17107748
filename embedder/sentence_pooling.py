"""Pooling a sequence of wordpiece vectors into one sentence vector, in every mode
sentence-transformers' ``Pooling`` module has, with its ``include_prompt`` rule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from embedder.devices import host_to_device

PoolingMode = Literal["mean", "cls", "max", "lasttoken", "weightedmean", "mean_sqrt_len_tokens"]
POOLING_MODES: tuple[str, ...] = get_args(PoolingMode)


def check_pooling_modes(modes: str | Sequence[str]) -> tuple[str, ...]:
    """One mode or several, each at most once (their vectors are concatenated, as sentence-transformers
    does), as a tuple; ``ValueError`` naming the valid modes for anything else."""
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    if not modes:
        raise ValueError(f"no pooling mode given; expected one or more of {POOLING_MODES}")
    for mode in modes:
        if mode not in POOLING_MODES:
            raise ValueError(f"Unknown pooling {mode!r}; expected one of {POOLING_MODES}")
    if len(set(modes)) != len(modes):
        raise ValueError(f"pooling {list(modes)} names a mode more than once; each mode may appear once")
    return modes


def pool_ragged(flat: torch.Tensor, lengths: torch.Tensor, modes: str | Sequence[str] = "mean",
                normalize: bool = False, skip: torch.Tensor | None = None) -> torch.Tensor:
    """Pool ``[sum(lengths), dim]`` rows, consecutive runs of ``lengths`` per sequence, to
    ``[n, dim * len(modes)]``, as sentence-transformers' ``Pooling`` does over an attention mask.

    ``mean`` averages every wordpiece (specials included), ``cls`` takes the first, ``max`` the
    element-wise maximum, ``lasttoken`` the last, ``weightedmean`` weights position ``i`` (from
    0) by ``i + 1``, ``mean_sqrt_len_tokens`` divides the sum by the square root of the count.
    ``skip`` (per sequence) leaves that many leading positions out: the prompt, when a model's
    pooling has ``include_prompt: false``; positions keep their weights. ``normalize`` scales
    each vector to unit L2 norm. Every reduction is deterministic.
    """
    modes = check_pooling_modes(modes)
    # checked where the lengths are (the host), before they move: the reductions below trust them
    if bool((lengths <= 0).any()):
        raise ValueError("cannot pool a sequence of no wordpieces")
    if int(lengths.sum()) != flat.size(0):
        raise ValueError(f"lengths add up to {int(lengths.sum())}, not to the {flat.size(0)} rows to pool")
    lengths = host_to_device(lengths.long(), flat.device)
    ends = torch.cumsum(lengths, 0)
    starts = ends - lengths
    rows = flat.size(0)  # given, so that repeating on the device needs no size from it
    position = torch.arange(rows, device=flat.device) - torch.repeat_interleave(starts, lengths, output_size=rows)
    skip = torch.zeros_like(lengths) if skip is None else host_to_device(skip.long(), flat.device)
    kept = position >= torch.repeat_interleave(skip, lengths, output_size=rows)
    weights = kept.to(flat.dtype)
    counts = _segment_sum(weights, lengths)
    outputs = []
    for mode in modes:
        if mode == "cls":
            first = torch.where(skip < lengths, starts + skip, starts)
            outputs.append(flat[first])
        elif mode == "lasttoken":
            outputs.append(flat[ends - 1] * (skip < lengths).to(flat.dtype).unsqueeze(-1))
        elif mode == "max":
            masked = flat.masked_fill(~kept.unsqueeze(-1), float("-inf"))
            outputs.append(_segment_max(masked, lengths))
        else:
            if mode == "weightedmean":
                weights_here = weights * (position + 1).to(flat.dtype)
                total = _segment_sum(weights_here, lengths)
            else:
                weights_here = weights
                total = counts if mode == "mean" else counts.sqrt()
            summed = _segment_sum(flat * weights_here.unsqueeze(-1), lengths)
            outputs.append(summed / total.clamp_min(1e-9).unsqueeze(-1))
    pooled = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
    return F.normalize(pooled, p=2, dim=-1) if normalize else pooled


def _segment_sum(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Sums of consecutive runs of rows, deterministic on every device, so replicas of one model answer
    bit-equal vectors. On CUDA a segmented reduction (``index_add`` adds with atomics there, in no fixed
    order); on the CPU ``index_add``, which adds in order and runs 6-40x faster than the CPU's segmented
    reduction (200k rows of 384: 21 ms against 811 ms as one run). ``unsafe``: the lengths were checked
    on the host, so the device need not check them (that would wait for it)."""
    if values.device.type == "cuda":
        return torch.segment_reduce(values, "sum", lengths=lengths, axis=0, unsafe=True)
    segments = torch.repeat_interleave(torch.arange(lengths.numel()), lengths, output_size=values.size(0))
    return values.new_zeros((lengths.numel(), *values.shape[1:])).index_add_(0, segments, values)


def _segment_max(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Element-wise maxima of consecutive runs of rows (exact in any order): a segmented reduction on
    CUDA, a maximum per run on the CPU (where the segmented reduction is the slow one)."""
    if values.device.type == "cuda":
        return torch.segment_reduce(values, "max", lengths=lengths, axis=0, unsafe=True)
    return torch.stack([run.amax(0) for run in values.split(lengths.tolist())])


def pool_sentences(embeddings: torch.Tensor, mask: torch.Tensor, modes: str | Sequence[str] = "mean",
                   normalize: bool = False) -> torch.Tensor:
    """Pool padded ``[batch, wordpieces, dim]`` with its (right-padded) mask to ``[batch, dim * len(modes)]``."""
    mask = mask.bool()
    return pool_ragged(embeddings[mask], mask.sum(-1), modes, normalize)
