"""Process-wide cache of transformer weights and tokenizers.

The cluster's version of AllenNLP's ``cached_transformers`` and
``PretrainedBertModel`` cache: a model spec loads once per process, whatever
number of embedders use it; a trainable embedder asks for its own copy. Models
load in float32, as AllenNLP's do, unless a dtype is asked for (transformers 5
would otherwise keep a checkpoint's saved dtype). A cached model is reloaded when
its weight files change on disk (``weights_fingerprint``), e.g. after retraining
into the same folder.
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel

from embedder.shared_tokenizer import SharedTokenizer
from embedder.weights import load_weights_file, weights_fingerprint

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
#: What a model loads in when no dtype is asked for (AllenNLP's), whatever dtype its checkpoint was saved in.
DEFAULT_DTYPE = torch.float32


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Turn a dtype name ("bf16", "float32", ...) or a torch dtype into a torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"Unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}") from None


def _freeze(value: Any) -> Any:
    """Make kwargs hashable so they can be part of a cache key."""
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, torch.dtype):
        return str(value)
    return value


@dataclass(frozen=True)
class ModelSpec:
    """Everything that changes the loaded weights: the cache key (with the files' fingerprint)."""

    model_name: str
    override_weights_file: str | None = None
    override_weights_strip_prefix: str | None = None
    dtype: str = str(DEFAULT_DTYPE).removeprefix("torch.")
    model_class: str | None = None
    load_kwargs: tuple = field(default=())

    @classmethod
    def create(
        cls,
        model_name: str | Path,
        *,
        override_weights_file: str | Path | None = None,
        override_weights_strip_prefix: str | None = None,
        dtype: str | torch.dtype | None = None,
        model_class: str | None = None,
        **load_kwargs: Any,
    ) -> "ModelSpec":
        """The spec of these arguments; ``dtype`` (or the older ``torch_dtype`` among the load kwargs,
        as ``from_pretrained`` takes it) defaults to ``DEFAULT_DTYPE``."""
        torch_dtype = load_kwargs.pop("torch_dtype", None)
        torch_dtype = resolve_dtype(dtype if dtype is not None else torch_dtype) or DEFAULT_DTYPE
        return cls(
            model_name=str(model_name),
            override_weights_file=None if override_weights_file is None else str(override_weights_file),
            override_weights_strip_prefix=override_weights_strip_prefix,
            dtype=str(torch_dtype).removeprefix("torch."),
            model_class=model_class,
            load_kwargs=_freeze(load_kwargs),
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype or DEFAULT_DTYPE)


@dataclass
class CacheInfo:
    """Counters that tell how often the cache had to load from disk."""

    model_loads: int = 0
    model_hits: int = 0
    tokenizer_loads: int = 0
    tokenizer_hits: int = 0


_lock = threading.RLock()
_models: dict[ModelSpec, tuple[str | None, PreTrainedModel]] = {}  # spec -> (files' fingerprint, model)
_tokenizers: dict[tuple, SharedTokenizer] = {}
_info = CacheInfo()


def _model_class(spec: ModelSpec) -> type:
    """``AutoModel``, or the ``transformers`` class the spec names (e.g. ``T5EncoderModel``)."""
    if spec.model_class is None:
        return AutoModel
    model_class = getattr(transformers, spec.model_class, None)
    if not (isinstance(model_class, type) and (issubclass(model_class, PreTrainedModel) or _is_auto_class(spec))):
        raise ValueError(f"{spec.model_class!r} is not a transformers model class")
    return model_class


def _is_auto_class(spec: ModelSpec) -> bool:
    """Whether the spec names an ``AutoModelFor...`` class (e.g. the masked-LM of a SPLADE model)."""
    return spec.model_class is not None and spec.model_class.startswith("AutoModel")


def model_from_config(spec: ModelSpec, config: transformers.PretrainedConfig, **kwargs: Any) -> PreTrainedModel:
    """A freshly initialized model of the spec's class built from ``config``."""
    if spec.model_class is None:
        return AutoModel.from_config(config, **kwargs)
    if _is_auto_class(spec):
        return _model_class(spec).from_config(config, **kwargs)
    return _model_class(spec)._from_config(config, **kwargs)


def _load_model(spec: ModelSpec) -> PreTrainedModel:
    kwargs = dict(spec.load_kwargs)
    if spec.override_weights_file is None:
        model = _model_class(spec).from_pretrained(spec.model_name, dtype=spec.torch_dtype, **kwargs)
    else:
        # built in the spec's dtype: from_config would otherwise build it in the dtype config.json names
        model = model_from_config(spec, AutoConfig.from_pretrained(spec.model_name, **kwargs), dtype=spec.torch_dtype)
        state_dict = load_weights_file(spec.override_weights_file, spec.override_weights_strip_prefix)
        _load_override_state_dict(model, state_dict, spec.override_weights_file)
    model.eval()
    return model


def _load_override_state_dict(
    model: PreTrainedModel, state_dict: dict[str, torch.Tensor], source: str
) -> None:
    model_keys = set(model.state_dict())
    matching = model_keys & set(state_dict)
    if not matching:
        raise ValueError(
            f"None of the {len(state_dict)} tensors in {source} matches a parameter of "
            f"{type(model).__name__} (check override_weights_strip_prefix)"
        )
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys:
        logger.warning("%s leaves %d parameters at their initial values: %s",
                       source, len(result.missing_keys), result.missing_keys[:5])
    if result.unexpected_keys:
        logger.warning("%s has %d tensors the model does not use: %s",
                       source, len(result.unexpected_keys), result.unexpected_keys[:5])


def get_model(
    model_name: str | Path,
    *,
    make_copy: bool = False,
    override_weights_file: str | Path | None = None,
    override_weights_strip_prefix: str | None = None,
    dtype: str | torch.dtype | None = None,
    model_class: str | None = None,
    **load_kwargs: Any,
) -> PreTrainedModel:
    """Return the transformer for this spec, loading it once per process (with ``AutoModel``,
    or the ``transformers`` class ``model_class`` names).

    ``make_copy=True`` returns a deep copy (for training) and leaves the shared
    instance untouched.
    """
    spec = ModelSpec.create(
        model_name,
        override_weights_file=override_weights_file,
        override_weights_strip_prefix=override_weights_strip_prefix,
        dtype=dtype,
        model_class=model_class,
        **load_kwargs,
    )
    return cached_model(spec, make_copy=make_copy)


def files_fingerprint(spec: ModelSpec) -> str | None:
    """``weights_fingerprint`` of the files ``spec`` loads, from this machine's files only (``stat``
    calls, no request to the hub per lookup); ``None`` while they are not here (a hub model not
    downloaded yet)."""
    try:
        return weights_fingerprint(spec.model_name, spec.override_weights_file, local_files_only=True)
    except OSError:
        return None


def cached_model(spec: ModelSpec, *, make_copy: bool = False) -> PreTrainedModel:
    """``get_model`` for a spec already built. The cached model is the one loaded from the files
    as they are now: when their fingerprint changed, it is loaded again (and the old one dropped)."""
    fingerprint = files_fingerprint(spec)
    with _lock:
        cached = _models.get(spec)
        if cached is not None and cached[0] == fingerprint:
            model = cached[1]
            _info.model_hits += 1
        else:
            logger.info("Loading %s%s", spec, "" if cached is None else " (its files changed)")
            model = _load_model(spec)
            # the fingerprint from before loading: files changing meanwhile make the next lookup reload
            _models[spec] = (files_fingerprint(spec) if fingerprint is None else fingerprint, model)
            _info.model_loads += 1
    return copy.deepcopy(model) if make_copy else model


def put_model(spec: ModelSpec, model: PreTrainedModel) -> None:
    """Make ``model`` the cached one for ``spec`` and its files as they are now (e.g. built from
    weights another process shared)."""
    fingerprint = files_fingerprint(spec)
    with _lock:
        _models[spec] = (fingerprint, model)


def get_tokenizer(model_name: str | Path, **tokenizer_kwargs: Any) -> SharedTokenizer:
    """Return the tokenizer for a model, loading it once per process.

    The tokenizer is shared by every caller, so it comes as a ``SharedTokenizer``: each thread
    tokenizes with its own copy, and nothing a call sets changes another's answer."""
    key = (str(model_name), _freeze(tokenizer_kwargs))
    with _lock:
        tokenizer = _tokenizers.get(key)
        if tokenizer is None:
            tokenizer = SharedTokenizer(AutoTokenizer.from_pretrained(str(model_name), **tokenizer_kwargs))
            _tokenizers[key] = tokenizer
            _info.tokenizer_loads += 1
        else:
            _info.tokenizer_hits += 1
    return tokenizer


def cache_info() -> CacheInfo:
    """A snapshot of the cache's load and hit counters."""
    with _lock:
        return copy.copy(_info)


def clear_cache() -> None:
    """Forget every cached model and tokenizer (and reset the counters)."""
    global _info
    with _lock:
        _models.clear()
        _tokenizers.clear()
        _info = CacheInfo()
