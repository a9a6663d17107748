"""Reading override weight files safely (safetensors, or torch files with ``weights_only``)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

logger = logging.getLogger(__name__)


def load_weights_file(path: str | Path, strip_prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Load a state dict, keep only keys starting with ``strip_prefix`` and strip it.

    Never unpickles arbitrary objects: ``.safetensors`` files are read as such,
    anything else through ``torch.load(weights_only=True)``.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        state_dict = load_file(str(path))
    else:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state_dict, dict):
            raise ValueError(f"{path} does not hold a state dict")
    if strip_prefix is None:
        return state_dict
    stripped = {k[len(strip_prefix):]: v for k, v in state_dict.items() if k.startswith(strip_prefix)}
    if not stripped:
        raise ValueError(
            f"Specified prefix of {strip_prefix!r} means no tensors will be loaded from {path}"
        )
    logger.info("Loading %d tensors from %s", len(stripped), path)
    return stripped
