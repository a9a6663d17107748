"""Pooling a sequence of wordpiece vectors into one sentence vector, and the
sentence-transformers folder files that set its defaults."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

PoolingMode = Literal["mean", "cls", "max"]
POOLING_MODES: tuple[str, ...] = ("mean", "cls", "max")


def pool_ragged(flat: torch.Tensor, lengths: torch.Tensor, mode: PoolingMode = "mean",
                normalize: bool = False) -> torch.Tensor:
    """Pool ``[sum(lengths), dim]`` rows, consecutive runs of ``lengths`` per sequence, to ``[n, dim]``.

    ``mean`` averages every wordpiece (specials included, as sentence-transformers
    does over its attention mask), ``cls`` takes the first, ``max`` the
    element-wise maximum. ``normalize`` scales each vector to unit L2 norm.
    """
    if mode not in POOLING_MODES:
        raise ValueError(f"Unknown pooling {mode!r}; expected one of {POOLING_MODES}")
    lengths = lengths.to(device=flat.device, dtype=torch.long)
    if bool((lengths <= 0).any()):
        raise ValueError("cannot pool a sequence of no wordpieces")
    n, dim = lengths.numel(), flat.size(-1)
    if mode == "cls":
        pooled = flat[torch.cumsum(lengths, 0) - lengths]
    else:
        owner = torch.repeat_interleave(torch.arange(n, device=flat.device), lengths)
        if mode == "mean":
            pooled = flat.new_zeros(n, dim).index_add(0, owner, flat) / lengths.unsqueeze(-1).to(flat.dtype)
        else:
            pooled = flat.new_zeros(n, dim).scatter_reduce(
                0, owner.unsqueeze(-1).expand(-1, dim), flat, reduce="amax", include_self=False)
    return F.normalize(pooled, p=2, dim=-1) if normalize else pooled


def pool_sentences(embeddings: torch.Tensor, mask: torch.Tensor, mode: PoolingMode = "mean",
                   normalize: bool = False) -> torch.Tensor:
    """Pool padded ``[batch, wordpieces, dim]`` with its mask to ``[batch, dim]``."""
    mask = mask.bool()
    return pool_ragged(embeddings[mask], mask.sum(-1), mode, normalize)


@dataclass(frozen=True)
class PoolingDefaults:
    """The pooling a model folder asks for."""

    mode: PoolingMode = "mean"
    normalize: bool = False


def read_pooling_defaults(model_dir: str | Path) -> PoolingDefaults | None:
    """Read a sentence-transformers folder's pooling (``1_Pooling/config.json``)
    and normalization (a ``Normalize`` module in ``modules.json``); ``None`` if absent."""
    folder = Path(model_dir)
    modules_file = folder / "modules.json"
    modules = json.loads(modules_file.read_text()) if modules_file.is_file() else []
    pooling_dir = next((m.get("path", "") for m in modules if m.get("type", "").endswith(".Pooling")), "1_Pooling")
    config_file = folder / pooling_dir / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    if config.get("pooling_mode_cls_token"):
        mode = "cls"
    elif config.get("pooling_mode_max_tokens"):
        mode = "max"
    else:
        if not config.get("pooling_mode_mean_tokens"):
            logger.warning("%s asks for a pooling this project does not offer; using mean", config_file)
        mode = "mean"
    normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
    return PoolingDefaults(mode=mode, normalize=normalize)
