"""Rerankers: a sentence-transformers ``CrossEncoder`` folder scored in plain torch, long documents in windows.

``read_cross_encoder_folder`` reads a folder as sentence-transformers 6 reads it: a plain
``transformers`` ``*ForSequenceClassification`` folder, or one saved by sentence-transformers
(``modules.json`` with its one Transformer module, ``config_sentence_transformers.json`` with
``model_type: CrossEncoder``, the activation and the prompts). The activation is
sentence-transformers' choice: the folder's (``config_sentence_transformers.json``, else
``config.json``'s ``sentence_transformers.activation_fn``, else the older
``sbert_ce_default_activation_function``), else sigmoid for one label and identity for more.
Only the torch activations of ``ACTIVATIONS`` are honoured: nothing named in a folder is ever
imported. Whatever a folder asks for that cannot be reproduced is an ``UnsupportedModelError``
(a ``ValueError``) naming the module and the folder.

An LLM reranker (a ``*ForCausalLM`` folder, Qwen3-Reranker style) is read too: sentence-transformers'
``LogitScore`` (the "yes" logit minus the "no" logit at the last position), its chat template and
instruction (``embedder.llm_reranker``).

``CrossEncoderScorer`` scores (query, document) pairs: a pair that fits in ``max_length``
exactly as ``CrossEncoder.predict`` scores it (the same tokenizer call); with ``truncate`` a
longer pair is cut as ``CrossEncoder.predict`` cuts it; without, the document is read in
windows beside the whole query (``embedder.pair_windows``) and scored by its best window.
Two parts vary with the folder: the *head* (``SequenceClassificationHead``: the classifier's
logits; ``LogitScoreHead``: an LLM's yes/no logits) and the *pair format* (``TokenizerPairs``:
the tokenizer's pair template; ``ChatTemplatePairs``: an LLM reranker's chat template).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import transformers
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from embedder.batching import plan_sub_batches
from embedder.cache import get_tokenizer
from embedder.chunking import TooManyChunksError
from embedder.devices import choose_dtype, host_to_device, resolve_device
from embedder.lengths import resolve_max_length
from embedder.llm_reranker import (LLM_TASK, ChatTemplatePairs, LogitScoreHead, check_causal_modality,
                                   default_logit_score, infer_message_format, is_causal_lm, is_logit_score_module,
                                   read_logit_score)
from embedder.pair_windows import (Aggregate, InputTooLongError, aggregate_windows, check_aggregate, check_overlap,
                                   default_overlap, window_budget, window_spans)
from embedder.sentence_folder import (
    UnsupportedModelError,
    check_folder,
    module_kwargs,
    read_json,
    resolve_prompt,
    transformer_settings,
)

logger = logging.getLogger(__name__)

#: The activations a folder may name, by every dotted path sentence-transformers resolves to them.
_ACTIVATION_CLASSES: dict[str, type[nn.Module]] = {"Identity": nn.Identity, "Sigmoid": nn.Sigmoid,
                                                   "Tanh": nn.Tanh, "Softmax": nn.Softmax}
ACTIVATIONS: dict[str, type[nn.Module]] = {
    f"{module.__name__}.{name}": cls
    for module in (torch.nn, torch.nn.modules, torch.nn.modules.activation, torch.nn.modules.linear)
    for name, cls in _ACTIVATION_CLASSES.items() if getattr(module, name, None) is cls
}
#: What sentence-transformers falls back to: sigmoid for one label, identity for more.
SIGMOID = "torch.nn.modules.activation.Sigmoid"
IDENTITY = "torch.nn.modules.linear.Identity"
_DEFAULT_FOR_ONE, _DEFAULT_FOR_MANY = "the default for one label", "the default for several labels"
#: The Transformer module of a cross-encoder: sequence classification, text in, logits out as scores.
CROSS_ENCODER_TASK = "sequence-classification"
_TEXT_LOGITS = {"text": {"method": "forward", "method_output_name": "logits"}}
#: Model loading arguments a folder may set: passed on, or (the dtype: the caller's choice) left out.
_PASSED_MODEL_KWARGS = frozenset({"attn_implementation"})
_IGNORED_MODEL_KWARGS = frozenset({"dtype", "torch_dtype"})
#: Transformer settings read or checked here, or that change nothing ``predict`` computes.
_KNOWN_TRANSFORMER_KEYS = frozenset({"unpad_inputs", "query_length", "document_length", "backend",
                                       "cache_dir", "transformer_task", "modality_config", "module_output_name",
                                       "max_seq_length", "do_lower_case", "processing_kwargs", "query_expansion",
                                       "model_kwargs", "model_args", "processor_kwargs", "tokenizer_args",
                                       "config_kwargs", "config_args"})
DEFAULT_MAX_BATCH_TOKENS = 16384


@dataclass(frozen=True)
class CrossEncoderFolder:
    """What a reranker folder asks of scoring.

    transformer_path: where the classifier and its tokenizer are.
    activation / activation_source: the dotted path of the activation on the logits, and where
        it was found (a file and key, or sentence-transformers' default).
    max_seq_length: the length the folder sets (the Transformer module's tokenizer
        ``model_max_length`` or ``max_seq_length``), if any.
    prompts / default_prompt_name: from ``config_sentence_transformers.json``.
    processor_kwargs / config_kwargs / model_kwargs: the Transformer module's arguments.
    keep_in_fp32_modules: linear layers sentence-transformers computes in fp32.
    is_sentence_transformers: False for a plain ``transformers`` folder.
    logit_score: for an LLM reranker (``*ForCausalLM``), its ``LogitScore`` module (``None``: a
        plain folder's, "yes" minus "no", resolved with the tokenizer); ``is_llm`` says which.
    message_format: for an LLM reranker, how its chat template takes messages (``"flat"``,
        ``"structured"``, ``"auto"``: as sentence-transformers infers it; ``"infer"``: through the
        chat template when the tokenizer has one) or ``None`` when pairs go through the tokenizer's
        pair template (no ``message`` modality).
    """

    model_name: str
    transformer_path: str
    config: PretrainedConfig
    activation: str
    activation_source: str
    max_seq_length: int | None = None
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    processor_kwargs: dict[str, Any] = field(default_factory=dict)
    config_kwargs: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    keep_in_fp32_modules: tuple[str, ...] = ()
    is_sentence_transformers: bool = False
    is_llm: bool = False
    logit_score: LogitScoreHead | None = None
    message_format: str | None = None

    @property
    def num_labels(self) -> int:
        """The scores per input: one for an LLM reranker (``LogitScore``), the classifier's labels otherwise."""
        return 1 if self.is_llm else int(self.config.num_labels)

    @property
    def activation_is_default(self) -> bool:
        """Whether the folder names no activation (sentence-transformers' default applies)."""
        return self.activation_source in (_DEFAULT_FOR_ONE, _DEFAULT_FOR_MANY)


@dataclass(frozen=True)
class PairScore:
    """One pair's score and where in the document it comes from.

    score: a float for a one-label model, ``[labels]`` scores for more.
    start / end: the character span ``[start, end)`` of the document that was scored (the window
        the score comes from; the whole document when it fit; the kept part when truncated; the
        span of all windows for ``aggregate="mean"``).
    windows: how many windows the document was read in (1 when it fit or was truncated).
    """

    score: float | np.ndarray
    start: int
    end: int
    windows: int


def resolve_activation(path: Any, where: str) -> str:
    """``path`` when it names one of ``ACTIVATIONS``; ``UnsupportedModelError`` naming ``where`` and
    the value otherwise (never imported: a folder's string is only looked up)."""
    if path not in ACTIVATIONS:
        raise UnsupportedModelError(
            f"{where}: the activation {path!r} is not supported by embedding-cluster, so the scores cannot be "
            f"reproduced; supported: {', '.join(sorted(ACTIVATIONS))}")
    return path


def make_activation(path: str) -> nn.Module:
    """The activation module of one of ``ACTIVATIONS`` (a softmax over the labels)."""
    activation = ACTIVATIONS[path]
    return activation(dim=-1) if activation is nn.Softmax else activation()


def _folder_activation(model_name: str, settings: dict, config_json: dict, num_labels: int) -> tuple[str, str]:
    """The activation sentence-transformers 6 picks for a folder, and where it found it."""
    if settings.get("activation_fn") is not None:
        where = f"{model_name}/config_sentence_transformers.json activation_fn"
        return resolve_activation(settings["activation_fn"], where), where
    saved = config_json.get("sentence_transformers")
    if isinstance(saved, dict) and "activation_fn" in saved and saved["activation_fn"] is not None:
        where = f"{model_name}/config.json sentence_transformers.activation_fn"
        return resolve_activation(saved["activation_fn"], where), where
    if config_json.get("sbert_ce_default_activation_function") is not None:
        where = f"{model_name}/config.json sbert_ce_default_activation_function"
        return resolve_activation(config_json["sbert_ce_default_activation_function"], where), where
    return (SIGMOID, _DEFAULT_FOR_ONE) if num_labels == 1 else (IDENTITY, _DEFAULT_FOR_MANY)


@dataclass(frozen=True)
class _TransformerModule:
    """The Transformer module of a saved CrossEncoder, and what follows it."""

    path: str
    config: dict[str, Any]
    logit_score: LogitScoreHead | None = None
    message_format: str | None = None

    @property
    def is_llm(self) -> bool:
        return self.config.get("transformer_task") == LLM_TASK


def _read_transformer(model_name: str, modules: Any) -> _TransformerModule:
    """The Transformer module of a saved CrossEncoder (and an LLM reranker's LogitScore): its folder
    and its checked config."""
    if not isinstance(modules, list) or not modules:
        raise UnsupportedModelError(f"{model_name}: modules.json lists no modules")
    kinds = [str(entry.get("type", "")) if isinstance(entry, dict) else repr(entry) for entry in modules]
    for number, kind in enumerate(kinds):
        transformer = number == 0 and kind.startswith("sentence_transformers.") \
            and kind.rsplit(".", 1)[-1] == "Transformer"
        if not (transformer or (number == 1 and is_logit_score_module(kind))):
            raise UnsupportedModelError(
                f"{model_name}: module {kind!r} (modules.json entry {number}) is not supported by "
                f"embedding-cluster for a CrossEncoder, so its scores cannot be reproduced; a reranker must be "
                f"exactly one sentence_transformers Transformer module (an LLM reranker: then one LogitScore)")
    path = str(modules[0].get("path", ""))
    config = transformer_settings(model_name, path)
    where = f"{model_name}/{path or '.'} (Transformer module)"
    task = config.get("transformer_task", "feature-extraction")
    logit_score = read_logit_score(model_name, modules[1], 1) if len(modules) > 1 else None
    message_format = None
    if task == LLM_TASK:
        if logit_score is None:
            raise UnsupportedModelError(f"{where}: transformer_task {task!r} without a LogitScore module after it "
                                        "gives no scores")
        message_format = check_causal_modality(where, config.get("modality_config"), config.get("module_output_name"))
    elif task != CROSS_ENCODER_TASK:
        raise UnsupportedModelError(f"{where}: transformer_task {task!r} is neither a sequence-classification "
                                    f"reranker nor an LLM reranker ({LLM_TASK!r} with a LogitScore module)")
    elif logit_score is not None:
        raise UnsupportedModelError(f"{logit_score.source}: a LogitScore module needs a {LLM_TASK!r} Transformer, "
                                    f"not {task!r}")
    elif config.get("modality_config", _TEXT_LOGITS) != _TEXT_LOGITS \
            or config.get("module_output_name", "scores") != "scores":
        raise UnsupportedModelError(f"{where}: modality_config {config.get('modality_config')!r} / "
                                    f"module_output_name {config.get('module_output_name')!r}: only plain text "
                                    "in and logits out as scores are supported")
    for key in ("processing_kwargs", "query_expansion", "do_lower_case"):
        if config.get(key):
            raise UnsupportedModelError(f"{where}: {key} {config[key]!r} is not supported")
    unknown = set(config) - _KNOWN_TRANSFORMER_KEYS
    if unknown:
        logger.info("%s: ignoring Transformer settings %s", where, sorted(unknown))
    return _TransformerModule(path, config, logit_score, message_format)


def read_cross_encoder_folder(model_name: str | Path) -> CrossEncoderFolder:
    """What ``CrossEncoder(model_name)`` builds, as data; ``UnsupportedModelError`` for anything
    that cannot be reproduced exactly."""
    model_name = str(model_name)
    check_folder(model_name)
    modules = read_json(model_name, "modules.json")
    settings: dict[str, Any] = {}
    transformer: dict[str, Any] = {}
    transformer_path = model_name
    module: _TransformerModule | None = None
    if modules is not None:
        settings = read_json(model_name, "config_sentence_transformers.json") or {}
        model_type = settings.get("model_type", "SentenceTransformer")
        if model_type != "CrossEncoder":
            raise UnsupportedModelError(f"{model_name}: a {model_type} model, not a CrossEncoder "
                                        "(sentence-transformers would put an untrained classifier on it)")
        module = _read_transformer(model_name, modules)
        transformer = module.config
        transformer_path = str(Path(model_name) / module.path) if module.path else model_name
    config_kwargs = module_kwargs(transformer, "config_kwargs", "config_args")
    model_kwargs = module_kwargs(transformer, "model_kwargs", "model_args")
    processor_kwargs = module_kwargs(transformer, "processor_kwargs", "tokenizer_args")
    unsupported = set(model_kwargs) - _PASSED_MODEL_KWARGS - _IGNORED_MODEL_KWARGS
    if unsupported:
        raise UnsupportedModelError(f"{model_name}: model_kwargs {sorted(unsupported)} of the Transformer module "
                                    "are not supported")
    config_json = read_json(transformer_path, "config.json")
    if not isinstance(config_json, dict):
        raise UnsupportedModelError(f"{model_name}: no config.json for the classifier in {transformer_path}")
    architectures = config_json.get("architectures") or []
    # sentence-transformers: a saved folder says its task; a plain one is an LLM reranker when its
    # first architecture is a causal LM, else a sequence classifier.
    is_llm = module.is_llm if module is not None else is_causal_lm(architectures)
    if is_llm and not is_causal_lm(architectures):
        raise UnsupportedModelError(f"{model_name}: an LLM reranker ({LLM_TASK!r} Transformer) whose architectures "
                                    f"{architectures} hold no *ForCausalLM model")
    if not is_llm and not any(str(a).endswith("ForSequenceClassification") for a in architectures):
        raise UnsupportedModelError(f"{model_name}: architectures {architectures} hold no *ForSequenceClassification "
                                    "model, so sentence-transformers would score with an untrained classifier")
    config = AutoConfig.from_pretrained(transformer_path, **config_kwargs)
    activation, source = _folder_activation(model_name, settings, config_json, 1 if is_llm else int(config.num_labels))
    prompts = {key: value for key, value in (settings.get("prompts") or {}).items() if value is not None}
    default_prompt_name = settings.get("default_prompt_name")
    if default_prompt_name is not None and default_prompt_name not in prompts:
        raise UnsupportedModelError(f"{model_name}: default_prompt_name {default_prompt_name!r} is not one of its "
                                    f"prompts {sorted(prompts)}")
    max_seq_length = processor_kwargs.get("model_max_length", transformer.get("max_seq_length"))
    return CrossEncoderFolder(
        model_name=model_name,
        transformer_path=transformer_path,
        config=config,
        activation=activation,
        activation_source=source,
        max_seq_length=None if max_seq_length is None else int(max_seq_length),
        prompts=prompts,
        default_prompt_name=default_prompt_name,
        processor_kwargs={k: v for k, v in processor_kwargs.items() if k != "model_max_length"},
        config_kwargs=config_kwargs,
        model_kwargs={k: v for k, v in model_kwargs.items() if k in _PASSED_MODEL_KWARGS},
        keep_in_fp32_modules=tuple(settings.get("keep_in_fp32_modules") or ()),
        is_sentence_transformers=modules is not None,
        is_llm=is_llm,
        logit_score=module.logit_score if module is not None else None,
        # a plain folder: sentence-transformers renders messages whenever the tokenizer has a chat template
        message_format=module.message_format if module is not None else "infer" if is_llm else None,
    )


@dataclass
class _Segments:
    """What goes through the model, before tokenizing: one (query, document text) pair per window."""

    queries: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)

    def add(self, owner: int, query: str, document: str, span: tuple[int, int], truncated: bool = False) -> None:
        self.owners.append(owner)
        self.queries.append(query)
        self.texts.append(document[span[0]:span[1]])
        self.spans.append(span)
        self.truncated.append(truncated)


@dataclass(frozen=True)
class ScoringPlan:
    """A call's pairs, tokenized as ``CrossEncoder.predict`` tokenizes them: one model input per
    segment (a whole pair, a truncated pair, or one window of a long document), ready to be run
    in any batch, with other calls' segments too (``CrossEncoderScorer.logits``).

    inputs: the model's token inputs (``input_ids``, ``token_type_ids``...), one list per segment.
    owners: the pair each segment belongs to, ascending. spans: each segment's character span
    of its document.
    """

    num_pairs: int
    inputs: dict[str, list[list[int]]]
    owners: np.ndarray
    spans: list[tuple[int, int]]

    @property
    def lengths(self) -> np.ndarray:
        """Each segment's tokens, specials included."""
        return np.array([len(ids) for ids in self.inputs["input_ids"]], dtype=np.int64)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def num_segments(self) -> int:
        return len(self.spans)


class ScoringHead(Protocol):
    """What turns the model's output into scores ``[rows, labels]``: a classifier's logits, or an
    LLM's yes/no logits (``LogitScoreHead``)."""

    num_labels: int
    auto_class: str  # the ``transformers`` Auto class that loads the model
    pads_left: bool  # whether inputs must be left-padded, whatever the tokenizer's side

    def scores(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The raw scores ``[rows, labels]`` of a padded batch of model inputs (each ``[rows, length]``)."""


@dataclass(frozen=True)
class SequenceClassificationHead:
    """A ``*ForSequenceClassification`` model: its logits are the scores."""

    num_labels: int
    auto_class = "AutoModelForSequenceClassification"
    pads_left = False

    def scores(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The classifier's logits ``[rows, num_labels]`` of a padded batch (inputs ``[rows, length]``)."""
        return model(**batch).logits


class PairFormat(Protocol):
    """How a (query, document) pair becomes tokens, as sentence-transformers makes them:
    ``TokenizerPairs`` (the tokenizer's pair template) or ``ChatTemplatePairs`` (an LLM reranker's
    chat template). ``prompt`` is the resolved prompt text (``None``: none)."""

    num_special: int  # tokens a pair holds besides its two texts (the pair template's or chat template's)

    def lengths(self, queries: Sequence[str], documents: Sequence[str], prompt: str | None,
                document_pieces: Sequence[Sequence[int]]) -> list[int]:
        """Each whole pair's tokens, untruncated."""

    def window_budget(self, query: str, prompt: str | None, max_length: int) -> int:
        """Document tokens a window holds beside ``query`` (``pair_windows.window_budget``'s errors)."""

    def window_excess(self, query: str, texts: Sequence[str], prompt: str | None, max_length: int) -> int:
        """How many tokens the longest window ``(query, text)`` has over ``max_length`` (0 or less: all fit)."""

    def encode(self, queries: Sequence[str], texts: Sequence[str], truncated: Sequence[bool], prompt: str | None,
               max_length: int, keys: Sequence[str]) -> tuple[dict[str, list[list[int]]], list[tuple[int, int]]]:
        """The model inputs of each segment (``input_ids`` and those of ``keys`` the tokenizer gives),
        cut to ``max_length``, and each truncated segment's kept character span of its text."""

    def encode_texts(self, texts: Sequence[str], truncate: bool, max_length: int,
                     keys: Sequence[str]) -> tuple[dict[str, list[list[int]]], list[tuple[int, int]]]:
        """Single texts (a classifier's inputs) and the span of each that is kept."""


class TokenizerPairs(PairFormat):
    """``tokenizer(queries, documents)``: the tokenizer's pair template, the prompt before the query."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.num_special = tokenizer.num_special_tokens_to_add(pair=True)

    def _pieces(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False,
                              return_token_type_ids=False, verbose=False)["input_ids"]

    @staticmethod
    def _prompted(queries: Sequence[str], prompt: str | None) -> list[str]:
        return [prompt + query for query in queries] if prompt else list(queries)

    def lengths(self, queries: Sequence[str], documents: Sequence[str], prompt: str | None,
                document_pieces: Sequence[Sequence[int]]) -> list[int]:
        queries = self._prompted(queries, prompt)
        unique = list(dict.fromkeys(queries))
        query_lengths = dict(zip(unique, (len(ids) for ids in self._pieces(unique)))) if unique else {}
        return [query_lengths[query] + len(pieces) + self.num_special
                for query, pieces in zip(queries, document_pieces)]

    def window_budget(self, query: str, prompt: str | None, max_length: int) -> int:
        query_length = len(self._pieces(self._prompted([query], prompt))[0])
        return window_budget(max_length, self.num_special, query_length)

    def window_excess(self, query: str, texts: Sequence[str], prompt: str | None, max_length: int) -> int:
        return 0  # the budget is exact: a pair's tokens are its two texts' and the template's

    def encode(self, queries: Sequence[str], texts: Sequence[str], truncated: Sequence[bool], prompt: str | None,
               max_length: int, keys: Sequence[str]) -> tuple[dict[str, list[list[int]]], list[tuple[int, int]]]:
        encoded = self.tokenizer(self._prompted(queries, prompt), list(texts), truncation="longest_first",
                                 max_length=max_length, return_offsets_mapping=any(truncated), verbose=False)
        kept_spans = [(0, len(text)) for text in texts]
        for index in np.flatnonzero(truncated):
            kept = [encoded["offset_mapping"][index][p] for p, sequence in enumerate(encoded.sequence_ids(index))
                    if sequence == 1]
            kept_spans[index] = (min(s for s, _ in kept), max(e for _, e in kept)) if kept else (0, 0)
        inputs = {key: encoded[key] for key in ("input_ids", *keys) if key != "attention_mask" and key in encoded}
        return inputs, kept_spans

    def encode_texts(self, texts: Sequence[str], truncate: bool, max_length: int,
                     keys: Sequence[str]) -> tuple[dict[str, list[list[int]]], list[tuple[int, int]]]:
        encoded = self.tokenizer(list(texts), truncation=True, max_length=max_length, return_offsets_mapping=True,
                                 return_overflowing_tokens=False, verbose=False)
        num_special = self.tokenizer.num_special_tokens_to_add(pair=False)
        spans = []
        for index, length in enumerate(len(ids) for ids in self._pieces(texts)):
            if length == 0:
                raise ValueError(f"text {index} is empty (it holds no tokens)")
            if length + num_special > max_length and not truncate:
                raise InputTooLongError(f"text {index} has {length + num_special} tokens, more than max_length "
                                        f"{max_length} (pass truncate=True to cut it)")
            kept = [encoded["offset_mapping"][index][p] for p, sequence in enumerate(encoded.sequence_ids(index))
                    if sequence == 0]
            spans.append((min(s for s, _ in kept), max(e for _, e in kept)))
        inputs = {key: encoded[key] for key in ("input_ids", *keys) if key != "attention_mask" and key in encoded}
        return inputs, spans


@dataclass(frozen=True)
class CrossEncoderSettings:
    """A reranker folder with its tokenizer and the length pairs are scored at: all that decides
    how pairs are cut and windowed, without the weights. ``num_special``: the tokens a pair holds
    besides its texts (for an LLM reranker, its chat template's with no prompt); ``pairs`` and
    ``head``: how pairs become tokens and how the model's output becomes scores."""

    folder: CrossEncoderFolder
    tokenizer: Any
    max_length: int
    num_special: int
    pairs: PairFormat | None = None
    head: ScoringHead | None = None


def resolve_cross_encoder(folder: str | Path, max_length: int | None = None) -> CrossEncoderSettings:
    """Read a reranker folder and decide its length (``max_length`` overrides the folder's, as
    ``CrossEncoder(folder, max_length=...)``); ``UnsupportedModelError`` / ``ValueError`` for what
    cannot be scored as sentence-transformers scores it."""
    read = read_cross_encoder_folder(folder)
    name = read.model_name
    if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool)
                                   or max_length < 1):
        raise ValueError(f"max_length must be a positive integer, not {max_length!r}")
    tokenizer = get_tokenizer(read.transformer_path, **read.processor_kwargs)
    if not tokenizer.is_fast:
        raise UnsupportedModelError(f"{name}: windows need a fast tokenizer (for character offsets)")
    chat_template = getattr(tokenizer, "chat_template", None)
    if not read.is_llm and not read.is_sentence_transformers and chat_template:
        raise UnsupportedModelError(f"{name}: its tokenizer has a chat template, which sentence-transformers "
                                    "would render pairs with; chat-template sequence classifiers are not supported")
    head: ScoringHead = SequenceClassificationHead(read.num_labels)
    pairs: PairFormat = TokenizerPairs(tokenizer)
    if read.is_llm:
        read = _resolved_llm_folder(read, tokenizer)
        head = read.logit_score
        if read.message_format is not None:
            pairs = ChatTemplatePairs(tokenizer, read.message_format, name, prompts=list(read.prompts.values()))
    length = resolve_max_length(max_length, model_name=name, max_seq_length=read.max_seq_length,
                                tokenizer=tokenizer, config=read.config)
    num_special = pairs.num_special
    if length <= num_special + 1:
        raise ValueError(f"{name}: max_length {length} leaves no room beside the pair's {num_special} special tokens")
    return CrossEncoderSettings(read, tokenizer, length, num_special, pairs, head)


def _resolved_llm_folder(read: CrossEncoderFolder, tokenizer: Any) -> CrossEncoderFolder:
    """An LLM reranker's folder with what the tokenizer decides: a plain folder's yes/no tokens, and
    whether (and how) pairs are rendered through the chat template."""
    logit_score = read.logit_score or default_logit_score(tokenizer, read.model_name)
    chat_template = getattr(tokenizer, "chat_template", None)
    message_format = read.message_format
    if message_format == "infer":
        message_format = "auto" if chat_template else None
    if message_format is not None and not chat_template:
        raise UnsupportedModelError(f"{read.model_name}: the Transformer module renders pairs as chat messages, "
                                    "but the tokenizer has no chat template")
    if message_format == "auto":
        message_format = infer_message_format(read.config.model_type, chat_template)
    return dataclasses.replace(read, logit_score=logit_score, message_format=message_format)


class CrossEncoderScorer:
    """A reranker folder scoring (query, document) pairs as ``CrossEncoder(folder).predict`` does.

    ``max_length`` overrides the folder's length (as ``CrossEncoder(folder, max_length=...)``);
    ``dtype`` defaults to float32 (``"auto"``: the fastest on the device); ``device`` to CUDA
    when there is one. Forward passes hold at most ``max_batch_tokens`` tokens, padding included.
    """

    def __init__(self, folder: str | Path, max_length: int | None = None, dtype: str | torch.dtype | None = None,
                 device: str | torch.device | None = None, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS) -> None:
        settings = resolve_cross_encoder(folder, max_length)
        self.folder, self.tokenizer = settings.folder, settings.tokenizer
        self.max_length, self.num_special = settings.max_length, settings.num_special
        self.pairs, self.head = settings.pairs, settings.head
        self.device = resolve_device(device)
        self.dtype = torch.float32 if dtype is None else choose_dtype(dtype, self.device)
        name = self.folder.model_name
        if self.folder.keep_in_fp32_modules and self.dtype != torch.float32:
            raise UnsupportedModelError(f"{name}: keep_in_fp32_modules {list(self.folder.keep_in_fp32_modules)} "
                                        f"cannot be honoured in {self.dtype} (load it in float32)")
        if not isinstance(max_batch_tokens, int) or max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be a positive integer, not {max_batch_tokens!r}")
        self.max_batch_tokens = max_batch_tokens
        self.model = getattr(transformers, self.head.auto_class).from_pretrained(
            self.folder.transformer_path, config=self.folder.config, dtype=self.dtype, **self.folder.model_kwargs)
        self.model.to(self.device).eval()
        self.activation = make_activation(self.folder.activation)
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        parameters = inspect.signature(self.model.forward).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        self._inputs = tuple(key for key in self.tokenizer.model_input_names if takes_any or key in parameters)
        logger.info("Loaded reranker %s: %d label(s), activation %s (%s), max_length %d, %s on %s", name,
                    self.num_labels, self.folder.activation, self.folder.activation_source, self.max_length,
                    str(self.dtype).removeprefix("torch."), self.device)

    @property
    def num_labels(self) -> int:
        return self.folder.num_labels

    def predict(self, pairs: Sequence[tuple[str, str]], batch_size: int = 32, activate: bool = True,
                truncate: bool = False, *, apply_softmax: bool = False, aggregate: Aggregate = "max",
                window_overlap: int | None = None, prompt: str | None = None, prompt_name: str | None = None,
                max_windows: int | None = None) -> np.ndarray:
        """``[n]`` scores for a one-label model, ``[n, labels]`` for more, as ``CrossEncoder.predict``
        gives them; ``activate=False``: the raw logits (``activation_fn=Identity``). See ``score_pairs``."""
        scores = self.score_pairs(pairs, batch_size=batch_size, activate=activate, truncate=truncate,
                                  apply_softmax=apply_softmax, aggregate=aggregate, window_overlap=window_overlap,
                                  prompt=prompt, prompt_name=prompt_name, max_windows=max_windows)
        if not scores:
            return np.zeros((0,) if self.num_labels == 1 else (0, self.num_labels), dtype=np.float32)
        return np.stack([np.asarray(s.score, dtype=np.float32) for s in scores])

    def score_pairs(self, pairs: Sequence[tuple[str, str]], *, batch_size: int = 32, activate: bool = True,
                    truncate: bool = False, apply_softmax: bool = False, aggregate: Aggregate = "max",
                    window_overlap: int | None = None, prompt: str | None = None, prompt_name: str | None = None,
                    max_windows: int | None = None) -> list[PairScore]:
        """Each pair's ``PairScore``.

        A pair that fits in ``max_length`` is scored as ``CrossEncoder.predict`` scores it. A longer
        one is, with ``truncate``, cut as ``CrossEncoder.predict`` cuts it (``longest_first``);
        without, its document is read in windows beside the whole query (``window_overlap``
        wordpieces shared by consecutive windows, default a quarter of a window), and
        ``aggregate`` makes its score: the best window's (``max``), the first's, or their
        ``mean``. The folder's default prompt goes before each query, unless ``prompt`` or
        ``prompt_name`` picks another. ``apply_softmax`` (several labels) as in
        ``CrossEncoder.predict``. More than ``max_windows`` windows in all is a
        ``TooManyChunksError``; an empty document is a ``ValueError``.
        """
        check_batch_size(batch_size)
        plan = self.plan(pairs, truncate=truncate, aggregate=aggregate, window_overlap=window_overlap,
                         prompt=prompt, prompt_name=prompt_name, max_windows=max_windows)
        return self.finish(plan, self.logits([plan], batch_size)[0], activate=activate, apply_softmax=apply_softmax,
                           aggregate=aggregate)

    def plan(self, pairs: Sequence[tuple[str, str]], *, truncate: bool = False, aggregate: Aggregate = "max",
             window_overlap: int | None = None, prompt: str | None = None, prompt_name: str | None = None,
             max_windows: int | None = None, windows: bool = True) -> ScoringPlan:
        """The segments ``score_pairs`` runs for ``pairs``, tokenized (the same arguments). With
        ``windows=False`` a pair longer than ``max_length`` is an ``InputTooLongError`` unless
        ``truncate`` cuts it (no window is planned)."""
        queries, documents = _split_pairs(pairs)
        check_aggregate(aggregate)
        if not queries:
            return ScoringPlan(0, {"input_ids": []}, np.zeros(0, dtype=np.int64), [])
        text_prompt = self._prompt(prompt, prompt_name)
        segments = self._plan(queries, documents, text_prompt, truncate, aggregate, window_overlap, max_windows,
                              windows)
        return self._tokenized(segments, len(queries), text_prompt)

    def plan_texts(self, texts: Sequence[str], *, truncate: bool = False) -> ScoringPlan:
        """Single texts (a classifier's inputs), tokenized as ``CrossEncoder.predict`` tokenizes one
        text; one longer than ``max_length`` is a ``ValueError`` unless ``truncate`` cuts it."""
        if isinstance(texts, (str, bytes)) or not all(isinstance(text, str) for text in texts):
            raise TypeError("texts must be a list of strings")
        texts = list(texts)
        if not texts:
            return ScoringPlan(0, {"input_ids": []}, np.zeros(0, dtype=np.int64), [])
        inputs, spans = self.pairs.encode_texts(texts, truncate, self.max_length, self._inputs)
        return ScoringPlan(len(texts), inputs, np.arange(len(texts), dtype=np.int64), spans)

    def logits(self, plans: Sequence[ScoringPlan], batch_size: int | None = None) -> list[np.ndarray]:
        """The model's raw scores ``[segments, labels]`` of each plan's segments (a classifier's
        logits; an LLM reranker's yes minus no logit), all plans' segments run together in
        length-sorted batches of at most ``max_batch_tokens`` tokens (padding included) and
        ``batch_size`` rows, each padded only to its longest."""
        merged: dict[str, list[list[int]]] = {key: [] for key in plans[0].inputs} if plans else {}
        for plan in plans:
            for key in merged:
                merged[key].extend(plan.inputs[key])
        lengths = np.array([len(ids) for ids in merged.get("input_ids", [])], dtype=np.int64)
        logits = np.empty((len(lengths), self.num_labels), dtype=np.float32)
        if len(lengths):
            with torch.inference_mode():
                for group in plan_sub_batches(lengths, self.max_batch_tokens):
                    step = batch_size or len(group)
                    for start in range(0, len(group), step):
                        rows = group[start:start + step]
                        batch = self._padded(merged, rows, int(lengths[rows].max()))
                        logits[rows] = self.head.scores(self.model, batch).float().cpu().numpy()
        bounds = np.cumsum([plan.num_segments for plan in plans])
        return np.split(logits, bounds[:-1]) if plans else []

    def finish(self, plan: ScoringPlan, logits: np.ndarray, *, activate: bool = True, apply_softmax: bool = False,
               aggregate: Aggregate = "max") -> list[PairScore]:
        """Each pair's ``PairScore`` from its plan and the logits of its segments: the folder's
        activation (unless ``activate`` is False), then ``aggregate`` over a document's windows."""
        scores = torch.from_numpy(logits)
        if activate:
            scores = self.activation(scores)
        if self.num_labels == 1:
            scores = scores.squeeze(-1)
        elif apply_softmax:
            scores = torch.softmax(scores, dim=1)
        scores = scores.numpy()
        bounds = np.searchsorted(plan.owners, np.arange(plan.num_pairs + 1))
        results: list[PairScore] = []
        for owner in range(plan.num_pairs):
            first, last = int(bounds[owner]), int(bounds[owner + 1])
            score, (start, end) = aggregate_windows(scores[first:last], plan.spans[first:last], aggregate)
            results.append(PairScore(score=float(score) if np.ndim(score) == 0 else np.asarray(score),
                                     start=int(start), end=int(end), windows=last - first))
        return results

    def rank(self, query: str, documents: Sequence[str], top_k: int | None = None, *, return_documents: bool = False,
             batch_size: int = 32, activate: bool = True, truncate: bool = False, aggregate: Aggregate = "max",
             window_overlap: int | None = None, prompt: str | None = None, prompt_name: str | None = None,
             max_windows: int | None = None) -> list[dict[str, Any]]:
        """``CrossEncoder.rank``: ``{"corpus_id", "score"}`` per document (and ``"text"`` with
        ``return_documents``), best first, the ``top_k`` first; plus the scored span's ``start`` and
        ``end`` in the document. One-label models only, as in sentence-transformers."""
        if self.num_labels != 1:
            raise ValueError(f"{self.folder.model_name}: rank needs a one-label model, this one has "
                             f"{self.num_labels} labels (use predict with pairs)")
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, not {type(query).__name__}")
        if isinstance(documents, (str, bytes)):
            raise TypeError("documents must be a list of strings, not a single string")
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0):
            raise ValueError(f"top_k must be a non-negative integer or None, not {top_k!r}")
        documents = list(documents)
        scores = self.score_pairs([(query, document) for document in documents], batch_size=batch_size,
                                  activate=activate, truncate=truncate, aggregate=aggregate,
                                  window_overlap=window_overlap, prompt=prompt, prompt_name=prompt_name,
                                  max_windows=max_windows)
        results = []
        for index, result in enumerate(scores):
            entry: dict[str, Any] = {"corpus_id": index, "score": result.score, "start": result.start,
                                     "end": result.end}
            if return_documents:
                entry["text"] = documents[index]
            results.append(entry)
        results.sort(key=lambda entry: entry["score"], reverse=True)
        return results[:top_k]

    def plan_windows(self, query: str, document: str, window_overlap: int | None = None,
                     prompt: str | None = None, prompt_name: str | None = None) -> list[tuple[int, int]]:
        """The character spans of the windows ``score_pairs`` reads a pair's document in (one span,
        the whole document, when the pair fits)."""
        queries, documents = _split_pairs([(query, document)])
        segments = self._plan(queries, documents, self._prompt(prompt, prompt_name), truncate=False,
                              aggregate="first", window_overlap=window_overlap, max_windows=None)
        return list(segments.spans)

    def _prompt(self, prompt: str | None, prompt_name: str | None) -> str | None:
        """The prompt a call asks for (the folder's default one unless told)."""
        return resolve_prompt(self.folder.prompts, self.folder.default_prompt_name, prompt_name, prompt)

    def _plan(self, queries: list[str], documents: list[str], prompt: str | None, truncate: bool, aggregate: str,
              window_overlap: int | None, max_windows: int | None, windows: bool = True) -> _Segments:
        """The segments to score, pair by pair: the whole pair when it fits or is truncated, else
        one per window of its document (``windows=False``: an ``InputTooLongError`` instead)."""
        encoded = self._pieces(documents, offsets=True)
        lengths = self.pairs.lengths(queries, documents, prompt, encoded["input_ids"])
        budgets: dict[str, int] = {}
        segments = _Segments()
        for index, (query, document) in enumerate(zip(queries, documents)):
            if not encoded["input_ids"][index]:
                raise ValueError(f"document {index} is empty (it holds no tokens)")
            fits = lengths[index] <= self.max_length
            if fits or truncate:
                segments.add(index, query, document, (0, len(document)), truncated=not fits)
                continue
            if not windows:
                raise InputTooLongError(f"pair {index} has {lengths[index]} tokens, more than max_length "
                                        f"{self.max_length} (pass truncate: true to cut it)")
            if aggregate == "max" and self.num_labels > 1:
                raise ValueError(f"document {index} needs windows, and the maximum over windows needs a one-label "
                                 f"model (this one has {self.num_labels}): pass aggregate='mean' or 'first', or "
                                 "truncate=True")
            try:
                if query not in budgets:
                    budgets[query] = self.pairs.window_budget(query, prompt, self.max_length)
            except ValueError as error:
                raise type(error)(f"pair {index}: {error}") from None
            remaining = None if max_windows is None else max_windows - len(segments.owners)
            for span in self._windows(query, document, encoded, index, budgets[query], prompt, window_overlap,
                                      remaining, max_windows):
                segments.add(index, query, document, span)
        if max_windows is not None and len(segments.owners) > max_windows:
            raise TooManyChunksError(max_windows)
        return segments

    def _windows(self, query: str, document: str, encoded: Any, index: int, budget: int, prompt: str | None,
                 window_overlap: int | None, remaining: int | None, max_windows: int | None) -> list[tuple[int, int]]:
        """The spans of a long document's windows beside ``query``: ``budget`` document tokens each,
        fewer while the longest window does not fit (a chat template's tokens can merge with the text's)."""
        while True:
            overlap = default_overlap(budget) if window_overlap is None else window_overlap
            check_overlap(overlap, budget)
            try:
                spans = window_spans(encoded["offset_mapping"][index], encoded.word_ids(index), budget, overlap,
                                     remaining)
            except TooManyChunksError:
                raise TooManyChunksError(max_windows) from None
            excess = self.pairs.window_excess(query, [document[start:end] for start, end in spans], prompt,
                                              self.max_length)
            if excess <= 0:
                return spans
            budget -= excess

    def _pieces(self, texts: list[str], offsets: bool = False) -> Any:
        return self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                              return_token_type_ids=False, return_offsets_mapping=offsets, verbose=False)

    def _tokenized(self, segments: _Segments, num_pairs: int, prompt: str | None) -> ScoringPlan:
        """The segments tokenized as ``CrossEncoder.predict`` tokenizes pairs, with the character
        span each kept of its document (the kept part of a truncated one)."""
        inputs, kept = self.pairs.encode(segments.queries, segments.texts, segments.truncated, prompt,
                                         self.max_length, self._inputs)
        spans = list(segments.spans)
        for index in np.flatnonzero(segments.truncated):
            start = segments.spans[index][0]
            spans[index] = (start + kept[index][0], start + kept[index][1])
        return ScoringPlan(num_pairs, inputs, np.asarray(segments.owners, dtype=np.int64), spans)

    def _padded(self, inputs: dict[str, list[list[int]]], rows: np.ndarray, width: int) -> dict[str, torch.Tensor]:
        """The model inputs of ``rows``, padded to ``width`` on the tokenizer's padding side."""
        pads = {"input_ids": self.pad_token_id, "token_type_ids": self.tokenizer.pad_token_type_id,
                "attention_mask": 0}
        left = self.head.pads_left or self.tokenizer.padding_side == "left"
        batch = {}
        for key in self._inputs:
            if key == "attention_mask":
                values = [[1] * len(inputs["input_ids"][row]) for row in rows]
            elif key in inputs:
                values = [inputs[key][row] for row in rows]
            else:
                continue
            array = np.full((len(rows), width), pads.get(key, 0), dtype=np.int64)
            for line, value in enumerate(values):
                if left:
                    array[line, width - len(value):] = value
                else:
                    array[line, :len(value)] = value
            batch[key] = host_to_device(array, self.device)
        return batch


def check_batch_size(batch_size: Any) -> None:
    """``ValueError`` unless ``batch_size`` is a positive integer."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}")


def _split_pairs(pairs: Sequence[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """The queries and the documents of ``pairs``, checked to be pairs of strings."""
    if isinstance(pairs, (str, bytes)) or not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs):
        raise TypeError("pairs must be a list of (query, document) pairs")
    for index, pair in enumerate(pairs):
        if not all(isinstance(text, str) for text in pair):
            raise TypeError(f"pairs[{index}] must hold two strings, not {[type(t).__name__ for t in pair]}")
    return [p[0] for p in pairs], [p[1] for p in pairs]
