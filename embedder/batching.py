"""Token-budget batching: which segments run together in one forward pass."""

from __future__ import annotations

import numpy as np


def plan_sub_batches(lengths: np.ndarray, max_batch_tokens: int) -> list[np.ndarray]:
    """Group segments, longest first, so each group padded to its own longest
    segment computes at most ``max_batch_tokens`` tokens (a single segment
    longer than the budget runs alone). Returns segment indices per group."""
    if max_batch_tokens < 1:
        raise ValueError("max_batch_tokens must be positive")
    order = np.argsort(-np.asarray(lengths), kind="stable")
    groups: list[np.ndarray] = []
    start = 0
    while start < len(order):
        width = int(lengths[order[start]])
        size = max(1, max_batch_tokens // max(width, 1))
        groups.append(order[start:start + size])
        start += size
    return groups


def padded_tokens(lengths: np.ndarray, groups: list[np.ndarray]) -> int:
    """Tokens the encoder computes for ``groups``, padding included."""
    return sum(len(g) * int(lengths[g].max()) for g in groups)
