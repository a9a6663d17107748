"""Choosing a device and the dtype that runs fastest on it."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from embedder.cache import resolve_dtype


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matrix instructions (AVX512_BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(device: str | None = "auto") -> torch.device:
    """``auto`` picks CUDA when this process sees a GPU, else the CPU (in a Ray actor, the serving code
    places by what Ray gave the actor instead: ``deployments.loading.replica_device``)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def host_to_device(array: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host array or tensor on ``device`` (a numpy array's memory shared on the CPU): to CUDA through
    pinned memory without waiting on the device (a pageable copy blocks until the stream is idle)."""
    tensor = torch.as_tensor(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def choose_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU that runs it natively (Ampere and later; emulated bf16 on a T4 or V100
    is slow, so fp16 there), bf16 on a CPU with fast bf16, else fp32. Any explicit dtype wins."""
    if dtype not in (None, "auto"):
        return resolve_dtype(dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32
