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
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AutoConfig, PreTrainedModel

from embedder.cache import ModelSpec, model_from_config

_RAW_BITS = {torch.bfloat16: torch.int16}


@dataclass
class WeightArrays:
    """A model's tensors (parameters and buffers, by name) as numpy arrays, for one cache key.
    A tied tensor (one tensor under several names) is stored once; ``aliases`` maps its other
    names to the stored one."""

    spec: ModelSpec
    arrays: dict[str, np.ndarray]
    dtypes: dict[str, str]
    aliases: dict[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in self.arrays.values())


def export_weights(spec: ModelSpec, model: PreTrainedModel) -> WeightArrays:
    """Every parameter and buffer of ``model`` as numpy arrays (views of the CPU tensors where
    possible), each tensor once however many names it has."""
    arrays, dtypes, aliases = {}, {}, {}
    names_by_tensor: dict[int, str] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False),
                         *model.named_buffers(remove_duplicate=False)]:
        if id(tensor) in names_by_tensor:
            aliases[name] = names_by_tensor[id(tensor)]
            continue
        names_by_tensor[id(tensor)] = name
        tensor = tensor.detach().cpu().contiguous()
        dtypes[name] = str(tensor.dtype).removeprefix("torch.")
        raw = _RAW_BITS.get(tensor.dtype)
        arrays[name] = (tensor.view(raw) if raw is not None else tensor).numpy()
    return WeightArrays(spec=spec, arrays=arrays, dtypes=dtypes, aliases=aliases)


def _tensor(array: np.ndarray, dtype_name: str) -> torch.Tensor:
    with warnings.catch_warnings():
        # the object store's arrays are read-only; inference never writes to weights
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(array)
    dtype = getattr(torch, dtype_name)
    return tensor.view(dtype) if dtype in _RAW_BITS else tensor


def model_from_weights(weights: WeightArrays) -> PreTrainedModel:
    """The model of ``weights.spec`` built from its config, its tensors sharing the arrays' memory
    (tied tensors stay one tensor).

    Raises ``ValueError`` when the arrays do not cover every parameter and buffer
    of the model the config builds.
    """
    spec = weights.spec
    config = AutoConfig.from_pretrained(spec.model_name, **dict(spec.load_kwargs))
    with torch.device("meta"):
        model = model_from_config(spec, config, dtype=spec.torch_dtype)
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    buffers = {name for name, _ in model.named_buffers(remove_duplicate=False)}
    if missing := {n for n in parameters | buffers if weights.aliases.get(n, n) not in weights.arrays}:
        raise ValueError(f"the shared weights of {spec.model_name} lack {sorted(missing)[:5]}")
    tensors: dict[str, torch.Tensor] = {}

    def tensor(name: str) -> torch.Tensor:
        stored = weights.aliases.get(name, name)
        if stored not in tensors:
            value = _tensor(weights.arrays[stored], weights.dtypes[stored])
            tensors[stored] = torch.nn.Parameter(value, requires_grad=False) if stored in parameters else value
        return tensors[stored]

    state = model.state_dict(keep_vars=True)
    model.load_state_dict({name: tensor(name) for name in state}, strict=True, assign=True)
    for name in buffers - set(state):  # non-persistent buffers are not in the state dict
        module_name, _, leaf = name.rpartition(".")
        model.get_submodule(module_name).register_buffer(leaf, tensor(name), persistent=False)
    model.eval()
    return model
