"""Choosing a device and a dtype: what ``auto`` means on each kind of machine."""

from __future__ import annotations

import pytest
import torch

from embedder import devices
from embedder.devices import choose_dtype, resolve_device


@pytest.fixture
def machine(monkeypatch):
    """Pretend to be a machine with or without a GPU, bf16 on it, and fast bf16 on the CPU."""

    def set_machine(cuda: bool = False, cuda_bf16: bool = False, cpu_bf16: bool = False) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: cuda_bf16)
        monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: cpu_bf16)

    return set_machine


def test_auto_device(machine):
    machine(cuda=False)
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    machine(cuda=True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("device, cuda_bf16, cpu_bf16, expected", [
    ("cpu", False, False, torch.float32),   # an AVX2-only CPU
    ("cpu", False, True, torch.bfloat16),   # AVX512_BF16 or AMX
    ("cuda", True, False, torch.bfloat16),  # Ampere and later
    ("cuda", False, False, torch.float16),  # T4, V100
])
def test_auto_dtype(machine, device, cuda_bf16, cpu_bf16, expected):
    machine(cuda=device == "cuda", cuda_bf16=cuda_bf16, cpu_bf16=cpu_bf16)
    assert choose_dtype("auto", torch.device(device)) == expected
    assert choose_dtype("float32", torch.device(device)) == torch.float32  # an explicit dtype wins
    assert choose_dtype(torch.float16, torch.device(device)) == torch.float16


def test_cpu_flags_are_read_from_cpuinfo(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(devices, "Path", lambda _: cpuinfo)
    for flags, expected in [("fpu sse avx2", False), ("avx2 avx512f avx512_bf16", True), ("amx_bf16 amx_tile", True)]:
        cpuinfo.write_text(f"flags\t\t: {flags}\n")
        devices.cpu_has_fast_bf16.cache_clear()
        assert devices.cpu_has_fast_bf16() is expected
    devices.cpu_has_fast_bf16.cache_clear()
    with pytest.raises(ValueError, match="Unknown dtype 'int4'"):
        choose_dtype("int4", torch.device("cpu"))
