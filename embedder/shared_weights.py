"""A loaded transformer as plain numpy arrays, and back, without copying.

This is what lets many processes share one copy of a model's weights (the
cluster keeps the arrays in Ray's object store, which hands out read-only
views of shared memory): ``export_weights`` turns a model into arrays,
``model_from_weights`` builds the same model from the config on the meta
device and points its parameters and buffers at the arrays. bfloat16 has no
numpy dtype, so its raw bits travel as int16 and come back bit for bit.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoConfig, PreTrainedModel

from embedder.cache import ModelSpec, model_from_config

_RAW_BITS = {torch.bfloat16: torch.int16}


@dataclass
class WeightArrays:
    """A model's tensors (parameters and buffers, by name) as numpy arrays, for one cache key."""

    spec: ModelSpec
    arrays: dict[str, np.ndarray]
    dtypes: dict[str, str]

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in self.arrays.values())


def export_weights(spec: ModelSpec, model: PreTrainedModel) -> WeightArrays:
    """Every parameter and buffer of ``model`` as numpy arrays (views of the CPU tensors where possible)."""
    tensors = {**dict(model.named_buffers()), **dict(model.named_parameters(remove_duplicate=False))}
    arrays, dtypes = {}, {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        dtypes[name] = str(tensor.dtype).removeprefix("torch.")
        raw = _RAW_BITS.get(tensor.dtype)
        arrays[name] = (tensor.view(raw) if raw is not None else tensor).numpy()
    return WeightArrays(spec=spec, arrays=arrays, dtypes=dtypes)


def _tensor(array: np.ndarray, dtype_name: str) -> torch.Tensor:
    with warnings.catch_warnings():
        # the object store's arrays are read-only; inference never writes to weights
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(array)
    dtype = getattr(torch, dtype_name)
    return tensor.view(dtype) if dtype in _RAW_BITS else tensor


def model_from_weights(weights: WeightArrays) -> PreTrainedModel:
    """The model of ``weights.spec`` built from its config, its tensors sharing the arrays' memory.

    Raises ``ValueError`` when the arrays do not cover every parameter and buffer
    of the model the config builds.
    """
    spec = weights.spec
    config = AutoConfig.from_pretrained(spec.model_name, **dict(spec.load_kwargs))
    with torch.device("meta"):
        model = model_from_config(spec, config, dtype=spec.torch_dtype)
    expected = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    expected |= {name for name, _ in model.named_buffers()}
    if missing := expected - set(weights.arrays):
        raise ValueError(f"the shared weights of {spec.model_name} lack {sorted(missing)[:5]}")
    for name in expected:
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        tensor = _tensor(weights.arrays[name], weights.dtypes[name])
        if leaf in module._parameters:
            module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
        else:
            module._buffers[leaf] = tensor
    model.eval()
    return model
