"""Token-budget batching: which segments run together in one forward pass, and each group padded."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

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



@dataclass(frozen=True)
class PaddedGroup:
    """One sub-batch of segments, padded to its own longest, on the host (numpy).

    segments: ``[rows]`` the segments it holds (indices into the lengths it was planned from).
    positions: ``[width]`` 0 to ``width - 1``.
    mask: ``[rows, width]`` True where a position holds a real token.
    source: ``[rows, width]`` each position's index into the flat token array (0 under padding).
    ids: ``[rows, width]`` token ids, ``pad_token_id`` under padding.
    types: ``[rows, width]`` type ids (0 under padding), or ``None`` without type ids.
    """

    segments: np.ndarray
    positions: np.ndarray
    mask: np.ndarray
    source: np.ndarray
    ids: np.ndarray
    types: np.ndarray | None


def padded_groups(lengths: np.ndarray, starts: np.ndarray, token_ids: np.ndarray, type_ids: np.ndarray | None,
                  pad_token_id: int, max_batch_tokens: int) -> Iterator[PaddedGroup]:
    """The ``plan_sub_batches`` groups of segments of ``lengths`` (each starting at ``starts`` in the
    flat ``token_ids`` and ``type_ids``), each padded to its own longest: the one padded-group loop of
    every model kind."""
    for group in plan_sub_batches(lengths, max_batch_tokens):
        group_lengths = lengths[group]
        positions = np.arange(int(group_lengths.max()))
        mask = positions[None, :] < group_lengths[:, None]
        source = np.where(mask, starts[group][:, None] + positions[None, :], 0)
        yield PaddedGroup(segments=group, positions=positions, mask=mask, source=source,
                          ids=np.where(mask, token_ids[source], pad_token_id),
                          types=None if type_ids is None else np.where(mask, type_ids[source], 0))
