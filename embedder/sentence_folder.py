"""Reading a sentence-transformers model folder: what ``SentenceTransformer(folder)`` would build.

``modules.json`` is read in order: the ``Transformer`` module (its folder and
``sentence_bert_config.json``), ``Pooling``, then ``Dense``, ``LayerNorm``,
``Normalize`` (and ``Dropout``, a no-op at inference). Prompts come from
``config_sentence_transformers.json``. Anything this project cannot reproduce
exactly raises ``UnsupportedModelError`` naming the module and the folder, so
that a server refuses to start rather than answer different vectors. A folder
without ``modules.json`` is a plain ``transformers`` model, which
sentence-transformers pools with a mean: so does this project.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers.utils import cached_file

from embedder.sentence_pooling import check_pooling_modes

logger = logging.getLogger(__name__)

#: sentence-transformers' legacy pooling flags, in the order its ``Pooling`` concatenates them.
LEGACY_POOLING_FLAGS: dict[str, str] = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
#: Prompts every SentenceTransformer has (empty) unless its folder sets them.
DEFAULT_PROMPTS: dict[str, str] = {"query": "", "document": ""}
#: Encoder-decoder architectures whose encoder sentence-transformers loads on its own.
ENCODER_ONLY_CLASSES: dict[str, str] = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel",
                                        "umt5": "UMT5EncoderModel"}
#: A text whose tokens tell whether a tokenizer lowercases.
_LOWERCASE_PROBE = "Embedding Cluster ABC"
SUPPORTED_MODULES = ("Transformer", "Pooling", "Dense", "LayerNorm", "Normalize", "Dropout")
#: The names a Transformer module's settings file has had (sentence-transformers reads the first found).
TRANSFORMER_CONFIG_FILES = ("sentence_bert_config.json", "sentence_roberta_config.json",
                             "sentence_distilbert_config.json", "sentence_camembert_config.json",
                             "sentence_albert_config.json", "sentence_xlm-roberta_config.json",
                             "sentence_xlnet_config.json")
#: Transformer settings that only matter for training or for other tasks than ``encode``.
_IGNORED_TRANSFORMER_KEYS = {"max_seq_length", "do_lower_case", "model_args", "model_kwargs", "tokenizer_args",
                             "processor_kwargs", "config_args", "config_kwargs", "modality_config",
                             "module_output_name", "transformer_task", "processing_kwargs", "unpad_inputs",
                             "query_length", "document_length", "query_expansion", "backend",
                             "tokenizer_name_or_path", "cache_dir"}
#: Loading arguments that belong to the hub or to the operator, never to a folder: a folder that sets
#: ``trust_remote_code`` would run its own Python files on whoever loads it (sentence-transformers strips
#: these from folder configs too). Only the operator's own config passes them.
HUB_KWARGS = frozenset({"trust_remote_code", "token", "use_auth_token", "revision", "code_revision",
                        "local_files_only", "cache_dir", "subfolder", "force_download", "proxies"})


def module_kwargs(transformer: dict[str, Any], new: str, old: str) -> dict[str, Any]:
    """A Transformer module's loading arguments (its ``new`` key, else the older ``old`` one), less
    ``HUB_KWARGS``: the one rule by which every folder reader takes arguments from a folder."""
    kwargs = transformer.get(new, transformer.get(old)) or {}
    if not isinstance(kwargs, dict):
        raise UnsupportedModelError(f"{new} must be an object of loading arguments, not {type(kwargs).__name__}")
    dropped = sorted(set(kwargs) & HUB_KWARGS)
    if dropped:
        logger.warning("ignoring %s in a model folder's %s: only the operator's config may set them", dropped, new)
    return {key: value for key, value in kwargs.items() if key not in HUB_KWARGS}


class UnsupportedModelError(ValueError):
    """The folder asks for something the project cannot reproduce exactly."""


@dataclass(frozen=True)
class HeadModule:
    """One module after pooling: ``kind`` (Dense, LayerNorm or Normalize), its folder and config."""

    kind: str
    path: str
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SentenceFolder:
    """What a model folder asks of sentence encoding.

    transformer_path: where the transformer and its tokenizer are (the folder, or an old
        ``0_Transformer`` sub-folder).
    max_seq_length: the Transformer module's length, if it sets one.
    pooling_modes / include_prompt: the Pooling module.
    head: the modules after pooling, in order.
    prompts / default_prompt_name: from ``config_sentence_transformers.json``.
    tokenizer_kwargs / config_kwargs: the Transformer module's tokenizer and config arguments.
    model_class: a ``transformers`` class to load instead of ``AutoModel`` (T5's encoder).
    is_sentence_transformers: False for a plain ``transformers`` folder (mean pooling).
    """

    model_name: str
    transformer_path: str
    max_seq_length: int | None = None
    pooling_modes: tuple[str, ...] = ("mean",)
    include_prompt: bool = True
    head: tuple[HeadModule, ...] = ()
    prompts: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PROMPTS))
    default_prompt_name: str | None = None
    do_lower_case: bool = False
    tokenizer_kwargs: dict[str, Any] = field(default_factory=dict)
    config_kwargs: dict[str, Any] = field(default_factory=dict)
    model_class: str | None = None
    is_sentence_transformers: bool = False

    @property
    def normalizes(self) -> bool:
        return any(module.kind == "Normalize" for module in self.head)


def find_file(model_name: str, filename: str) -> Path | None:
    """A file of a local folder or a hub repository (through the hub cache), or ``None`` if it has none."""
    path = cached_file(model_name, filename, _raise_exceptions_for_missing_entries=False)
    return None if path is None else Path(path)


def read_json(model_name: str, filename: str) -> dict | list | None:
    """A JSON file of a model folder, or ``None`` if it has none (invalid JSON: ``UnsupportedModelError``)."""
    path = find_file(model_name, filename)
    if path is None:
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UnsupportedModelError(f"{model_name}: {filename} is not valid JSON ({error})") from None


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def _module_kind(model_name: str, entry: dict) -> str:
    kind = str(entry.get("type", ""))
    name = kind.rsplit(".", 1)[-1]
    if not kind.startswith("sentence_transformers.") or name not in SUPPORTED_MODULES:
        raise UnsupportedModelError(
            f"{model_name}: module {kind!r} (modules.json entry {entry.get('idx', '?')}, path "
            f"{entry.get('path', '')!r}) is not supported by embedding-cluster, so its vectors cannot be "
            f"reproduced; supported modules: {', '.join(SUPPORTED_MODULES)}")
    return name


def _pooling_modes(config: dict, where: str) -> tuple[str, ...]:
    """The modes of a Pooling config, in the new ``pooling_mode`` key or the old flags."""
    if "pooling_mode" in config:
        try:
            return check_pooling_modes(config["pooling_mode"])
        except ValueError as error:
            raise UnsupportedModelError(f"{where}: {error}") from None
    modes = tuple(mode for flag, mode in LEGACY_POOLING_FLAGS.items() if config.get(flag))
    return modes or ("mean",)


def _read_pooling(model_name: str, path: str) -> tuple[tuple[str, ...], bool]:
    where = f"{model_name}/{_join(path, 'config.json')}"
    config = read_json(model_name, _join(path, "config.json"))
    if not isinstance(config, dict):
        raise UnsupportedModelError(f"{where}: the Pooling module has no config")
    return _pooling_modes(config, where), bool(config.get("include_prompt", True))


def _read_head_module(model_name: str, kind: str, path: str) -> HeadModule:
    config = read_json(model_name, _join(path, "config.json")) or {}
    where = f"{model_name}/{path or '.'}"
    if config.get("module_input_name", "sentence_embedding") != "sentence_embedding" or \
            config.get("module_output_name") not in (None, "sentence_embedding"):
        raise UnsupportedModelError(f"{where}: a {kind} module that reads or writes "
                                    f"{config.get('module_input_name')!r} (token-level heads are not supported)")
    if kind == "Dense":
        activation = config.get("activation_function", "torch.nn.modules.activation.Tanh")
        if not str(activation).startswith("torch.nn."):
            raise UnsupportedModelError(f"{where}: the Dense activation {activation!r} is not a torch.nn module")
    return HeadModule(kind=kind, path=path, config=config)


def transformer_settings(model_name: str, path: str) -> dict[str, Any]:
    """A Transformer module's ``sentence_bert_config.json`` (or its older names) under ``path`` of the
    folder, ``{}`` when it has none: the one reader of it for every kind."""
    for filename in TRANSFORMER_CONFIG_FILES:
        found = read_json(model_name, _join(path, filename))
        if found is not None:
            return found
    return {}


def check_folder(model_name: str) -> None:
    """``UnsupportedModelError`` for a local path (absolute, or starting with ``.``) that is no folder; a
    hub id passes (the hub cache answers for it)."""
    if (Path(model_name).is_absolute() or model_name.startswith(".")) and not Path(model_name).is_dir():
        raise UnsupportedModelError(f"{model_name}: no such folder")


def check_lowercasing(model_name: str, do_lower_case: bool, tokenizer: Any) -> None:
    """``UnsupportedModelError`` when a folder asks for ``do_lower_case`` and its tokenizer does not
    lowercase (sentence-transformers would lowercase the texts before the tokenizer)."""
    if do_lower_case and tokenizer.tokenize(_LOWERCASE_PROBE) != tokenizer.tokenize(_LOWERCASE_PROBE.lower()):
        raise UnsupportedModelError(f"{model_name}: sentence_bert_config.json asks for do_lower_case, which its "
                                    "tokenizer does not do; lowercase texts before sending them and set it to false")


def _read_transformer(model_name: str, path: str) -> dict[str, Any]:
    """The Transformer module's ``sentence_bert_config.json`` (or an older name), checked."""
    config = transformer_settings(model_name, path)
    where = f"{model_name}/{path or '.'}"
    task = config.get("transformer_task", "feature-extraction")
    if task != "feature-extraction":
        raise UnsupportedModelError(f"{where}: transformer_task {task!r} is not an embedding model "
                                    "(only feature-extraction is served)")
    modalities = set(config.get("modality_config") or {"text": {}})
    if modalities != {"text"}:
        raise UnsupportedModelError(f"{where}: the Transformer takes {sorted(modalities)} inputs "
                                    "(chat-template 'message' or other modalities are not served; only plain text)")
    if config.get("module_output_name", "token_embeddings") != "token_embeddings":
        raise UnsupportedModelError(f"{where}: the Transformer writes {config['module_output_name']!r}, "
                                    "not token embeddings")
    for key in ("processing_kwargs", "query_expansion"):
        if config.get(key):
            raise UnsupportedModelError(f"{where}: {key} {config[key]!r} in the Transformer config is not supported")
    unknown = set(config) - _IGNORED_TRANSFORMER_KEYS
    if unknown:
        logger.info("%s: ignoring Transformer settings %s", where, sorted(unknown))
    return config


def read_sentence_folder(model_name: str | Path) -> SentenceFolder:
    """What ``SentenceTransformer(model_name)`` builds, as data; ``UnsupportedModelError`` for
    anything that cannot be reproduced. A folder without ``modules.json`` gives mean pooling."""
    model_name = str(model_name)
    check_folder(model_name)
    modules = read_json(model_name, "modules.json")
    if modules is None:
        return SentenceFolder(model_name=model_name, transformer_path=model_name,
                              model_class=_encoder_only_class(model_name, model_name))
    if not isinstance(modules, list) or not modules:
        raise UnsupportedModelError(f"{model_name}: modules.json lists no modules")
    kinds = [_module_kind(model_name, entry) for entry in modules]
    if kinds[0] != "Transformer" or "Transformer" in kinds[1:]:
        raise UnsupportedModelError(f"{model_name}: modules.json must start with its one Transformer module, "
                                    f"not {kinds}")
    if "Pooling" not in kinds:
        raise UnsupportedModelError(f"{model_name}: modules.json has no Pooling module, so the model gives no "
                                    "sentence vector")
    if kinds.count("Pooling") > 1 or kinds.index("Pooling") != 1:
        raise UnsupportedModelError(f"{model_name}: the Pooling module must come right after the Transformer "
                                    f"(modules: {kinds})")
    transformer_dir = str(modules[0].get("path", ""))
    transformer = _read_transformer(model_name, transformer_dir)
    modes, include_prompt = _read_pooling(model_name, str(modules[1].get("path", "")))
    head = tuple(_read_head_module(model_name, kind, str(entry.get("path", "")))
                 for kind, entry in zip(kinds[2:], modules[2:]) if kind != "Dropout")
    settings = read_json(model_name, "config_sentence_transformers.json") or {}
    model_type = settings.get("model_type", "SentenceTransformer")
    if model_type != "SentenceTransformer":
        raise UnsupportedModelError(f"{model_name}: a {model_type} model, not a SentenceTransformer "
                                    "(dense sentence embeddings)")
    prompts, default_prompt_name = read_prompts(model_name, settings)
    transformer_path = model_name if not transformer_dir else str(Path(model_name) / transformer_dir)
    return SentenceFolder(
        model_name=model_name,
        transformer_path=transformer_path,
        max_seq_length=transformer.get("max_seq_length"),
        pooling_modes=modes,
        include_prompt=include_prompt,
        head=head,
        prompts=prompts,
        default_prompt_name=default_prompt_name,
        do_lower_case=bool(transformer.get("do_lower_case", False)),
        tokenizer_kwargs=module_kwargs(transformer, "processor_kwargs", "tokenizer_args"),
        config_kwargs=module_kwargs(transformer, "config_kwargs", "config_args"),
        model_class=_encoder_only_class(model_name, transformer_path),
        is_sentence_transformers=True,
    )


def _encoder_only_class(model_name: str, transformer_path: str) -> str | None:
    """``T5EncoderModel`` (and its kin) for encoder-decoder models, as sentence-transformers loads them."""
    config = read_json(transformer_path, "config.json")
    if not isinstance(config, dict):
        raise UnsupportedModelError(f"{model_name}: no config.json for the transformer in {transformer_path}")
    return ENCODER_ONLY_CLASSES.get(config.get("model_type", ""))


def read_prompts(model_name: str, settings: dict) -> tuple[dict[str, str], str | None]:
    """The prompts of a ``config_sentence_transformers.json`` (the empty ``query`` and ``document``
    ones sentence-transformers adds unless it sets them) and its default prompt's name, checked."""
    prompts = {**DEFAULT_PROMPTS, **(settings.get("prompts") or {})}
    default_prompt_name = settings.get("default_prompt_name")
    if default_prompt_name is not None and default_prompt_name not in prompts:
        raise UnsupportedModelError(f"{model_name}: default_prompt_name {default_prompt_name!r} is not one of its "
                                    f"prompts {sorted(prompts)}")
    return prompts, default_prompt_name


def resolve_prompt(prompts: dict[str, str], default_prompt_name: str | None, prompt_name: str | None = None,
                   prompt: str | None = None) -> str | None:
    """The prompt text a request asks for: a literal ``prompt``, a ``prompt_name`` of the model's
    prompts, else the model's default prompt (sentence-transformers' rule); ``None`` for none.
    ``ValueError`` for an unknown name or for both fields at once."""
    if prompt is not None and prompt_name is not None:
        raise ValueError("give either 'prompt' or 'prompt_name', not both")
    if prompt is not None:
        return prompt or None
    if prompt_name is not None:
        if prompt_name not in prompts:
            raise ValueError(f"unknown prompt_name {prompt_name!r}; this model's prompts are {sorted(prompts)}")
        return prompts[prompt_name] or None
    if default_prompt_name is not None:
        return prompts.get(default_prompt_name) or None
    return None

