"""Token-budget batching: which segments run together in one forward pass."""

from __future__ import annotations

import numpy as np

#: A group stops growing when adding the next (shorter) segment would pad it below this.
MIN_GROUP_EFFICIENCY = 0.95


def plan_sub_batches(lengths: np.ndarray, max_batch_tokens: int,
                     min_efficiency: float = MIN_GROUP_EFFICIENCY) -> list[np.ndarray]:
    """Group segments, longest first, so that each group, padded to its own
    longest segment, computes at most ``max_batch_tokens`` tokens (a segment
    longer than the budget runs alone) with at least ``min_efficiency`` of its
    tokens real. Returns segment indices per group."""
    if max_batch_tokens < 1:
        raise ValueError("max_batch_tokens must be positive")
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    groups: list[np.ndarray] = []
    start = 0
    while start < len(order):
        width = max(int(lengths[order[start]]), 1)
        stop = min(len(order), start + max(1, max_batch_tokens // width))
        real = np.cumsum(lengths[order[start:stop]])
        efficient = real / (width * np.arange(1, stop - start + 1)) >= min_efficiency
        stop = start + max(1, int(np.argmin(efficient)) if not efficient.all() else len(efficient))
        groups.append(order[start:stop])
        start = stop
    return groups


def padded_tokens(lengths: np.ndarray, groups: list[np.ndarray]) -> int:
    """Tokens the encoder computes for ``groups``, padding included."""
    return sum(len(g) * int(np.asarray(lengths)[g].max()) for g in groups)
