"""``SentenceHead``: wordpiece vectors -> one sentence vector, as a sentence-transformers folder asks.

Pooling (every mode, with ``include_prompt``), then the folder's ``Dense``,
``LayerNorm`` and ``Normalize`` modules in order, with their weights. It runs in
float32 whatever the transformer's dtype.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from embedder.sentence_folder import HeadModule, SentenceFolder, UnsupportedModelError, find_file
from embedder.sentence_pooling import check_pooling_modes, pool_ragged
from embedder.weights import load_weights_file

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _activation(name: str) -> torch.nn.Module:
    """A ``torch.nn`` activation from the dotted class name sentence-transformers saves."""
    module_name, _, class_name = name.rpartition(".")
    activation = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(activation, type) and issubclass(activation, torch.nn.Module)):
        raise UnsupportedModelError(f"activation {name!r} is not a torch.nn module")
    return activation()


class Dense(torch.nn.Module):
    """sentence-transformers' ``Dense``: ``activation(linear(x))``, plus ``x`` (or a projection of it)
    with ``use_residual``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation_function: str = "torch.nn.modules.activation.Tanh", use_residual: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.linear = torch.nn.Linear(in_features, out_features, bias=bias)
        self.activation_function = _activation(activation_function)
        self.use_residual = use_residual
        if use_residual and in_features != out_features:
            self.residual = torch.nn.Linear(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, in_features]`` vectors through the linear layer and activation (plus the residual when
        asked): ``[n, out_features]``."""
        out = self.activation_function(self.linear(x))
        if self.use_residual:
            out = out + (self.residual(x) if hasattr(self, "residual") else x)
        return out


class LayerNorm(torch.nn.Module):
    """sentence-transformers' ``LayerNorm`` module over the sentence vector."""

    def __init__(self, dimension: int) -> None:
        super().__init__()
        self.in_features = self.out_features = dimension
        self.norm = torch.nn.LayerNorm(dimension)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, dim]`` sentence vectors layer-normalized: ``[n, dim]``."""
        return self.norm(x)


class Normalize(torch.nn.Module):
    """L2 normalization (sentence-transformers' ``Normalize``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, dim]`` vectors scaled to unit L2 norm: ``[n, dim]``."""
        return F.normalize(x, p=2, dim=-1)


def _load_module(folder: SentenceFolder, module: HeadModule) -> torch.nn.Module:
    where = f"{folder.model_name}/{module.path}"
    if module.kind == "Normalize":
        return Normalize()
    config = module.config
    try:
        if module.kind == "Dense":
            layer: torch.nn.Module = Dense(int(config["in_features"]), int(config["out_features"]),
                                           bias=bool(config.get("bias", True)),
                                           activation_function=config.get("activation_function",
                                                                          "torch.nn.modules.activation.Tanh"),
                                           use_residual=bool(config.get("use_residual", False)))
        else:
            layer = LayerNorm(int(config["dimension"]))
    except KeyError as missing:
        raise UnsupportedModelError(f"{where}: the {module.kind} config has no {missing}") from None
    except UnsupportedModelError as error:
        raise UnsupportedModelError(f"{where}: {error}") from None
    weights_file = next((path for name in _WEIGHT_FILES
                         if (path := find_file(folder.model_name, f"{module.path}/{name}")) is not None), None)
    if weights_file is None:
        raise UnsupportedModelError(f"{where}: the {module.kind} module has no weights ({' or '.join(_WEIGHT_FILES)})")
    try:
        layer.load_state_dict(load_weights_file(Path(weights_file)))
    except RuntimeError as error:
        raise UnsupportedModelError(f"{where}: its weights do not fit its config: {error}") from None
    return layer


class SentenceHead(torch.nn.Module):
    """Pools unfolded wordpiece vectors and applies the modules after pooling.

    ``forward`` takes a request's own ``pooling`` modes and ``normalize`` switch over
    the model's: ``normalize`` replaces the model's ``Normalize`` modules by one at the end
    (``True``) or by none (``False``).
    """

    def __init__(self, input_dim: int, pooling_modes: Sequence[str] = ("mean",), include_prompt: bool = True,
                 modules: Sequence[torch.nn.Module] = ()) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.pooling_modes = check_pooling_modes(pooling_modes)
        self.include_prompt = include_prompt
        self.layers = torch.nn.ModuleList(modules)
        self.output_dim = self.output_dim_for(self.pooling_modes)

    @classmethod
    def from_folder(cls, folder: SentenceFolder, input_dim: int, pooling_modes: Sequence[str] | None = None,
                    normalize: bool | None = None) -> "SentenceHead":
        """The folder's pooling and modules; ``pooling_modes`` / ``normalize`` override the folder's."""
        modules = [_load_module(folder, module) for module in folder.head]
        if normalize is not None and normalize != folder.normalizes:
            modules = [m for m in modules if not isinstance(m, Normalize)] + ([Normalize()] if normalize else [])
        return cls(input_dim, pooling_modes or folder.pooling_modes, folder.include_prompt, modules).eval()

    @property
    def normalizes(self) -> bool:
        return any(isinstance(m, Normalize) for m in self.layers)

    def get_output_dim(self) -> int:
        """The sentence vector's size with the folder's pooling modes, after every module."""
        return self.output_dim

    def output_dim_for(self, modes: tuple[str, ...]) -> int:
        """The sentence vector's dimension with these pooling modes (``ValueError`` when the
        modules after pooling cannot take their width)."""
        width = self.input_dim * len(modes)
        for layer in self.layers:
            if isinstance(layer, Normalize):
                continue
            if layer.in_features != width:
                raise ValueError(f"pooling {'+'.join(modes)} gives {width}-dimensional vectors, but the model's "
                                 f"{type(layer).__name__} takes {layer.in_features}")
            width = layer.out_features
        return width

    def forward(self, flat: torch.Tensor, lengths: torch.Tensor, prompt_lengths: torch.Tensor | None = None,
                pooling: str | Sequence[str] | None = None, normalize: bool | None = None) -> torch.Tensor:
        """``[sum(lengths), dim]`` unfolded wordpiece vectors (consecutive runs of ``lengths``) ->
        ``[n, output_dim]`` float32. ``prompt_lengths``: each sequence's leading prompt positions."""
        modes = self.pooling_modes if pooling is None else check_pooling_modes(pooling)
        if modes != self.pooling_modes:
            self.output_dim_for(modes)
        skip = None if self.include_prompt else prompt_lengths
        vectors = pool_ragged(flat.float(), lengths, modes, skip=skip)
        for layer in self.layers:
            if normalize is None or not isinstance(layer, Normalize):
                vectors = layer(vectors)
        return F.normalize(vectors, p=2, dim=-1) if normalize else vectors
