"""Reading weight files safely (safetensors, or torch files with ``weights_only``), and telling
one version of a model's files from another."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers.utils import cached_file

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


#: What a model's weights (and the architecture they fill) are read from.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")


def weights_fingerprint(model_name: str | Path, override_weights_file: str | Path | None = None, *,
                        local_files_only: bool = False) -> str:
    """A short digest of the name, size and modification time of every weight file and
    ``config.json`` of a model (a local folder, or a hub snapshot through the hub cache), and
    of an override file: it changes when the files are replaced, e.g. after retraining into the
    same folder, so caches keyed by it never hand out stale weights. Only ``stat`` calls, never
    the files' contents, so it is cheap for any size of model. ``local_files_only`` resolves a hub
    name from the hub cache without asking the hub (``OSError`` when it was never downloaded)."""
    config = cached_file(str(model_name), "config.json", local_files_only=local_files_only)
    folder = Path(config).parent
    files = [path for path in sorted(folder.rglob("*"))
             if path.is_file() and (path.suffix in WEIGHT_SUFFIXES or path.name == "config.json")]
    if override_weights_file is not None:
        files.append(Path(override_weights_file))
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
