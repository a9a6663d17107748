"""``SparseEncoderModel``: SPLADE vectors as ``SparseEncoder(folder).encode`` computes them.

A sentence-transformers ``SparseEncoder`` folder is a masked-LM transformer (``MLMTransformer``, or
the newer ``Transformer`` with ``transformer_task: fill-mask``) followed by ``SpladePooling``:
``log1p(relu(logits))`` (``log1p`` once more for ``activation_function: log1p_relu``) at every
real wordpiece, reduced over the sequence by ``max`` or ``sum``. ``read_sparse_folder`` reads such
a folder (sentence-transformers 6's module paths and 5's ``sparse_encoder.models.*``) and raises
``UnsupportedModelError`` for any module it does not reproduce (``SparseAutoEncoder``, ``Router``,
...), naming the module and the folder.

Inputs longer than the model's length are folded as everywhere in this project (each segment
encoded alone, the inner start and end tokens dropped): the vector of a folded input is the
``max`` (or ``sum``) of SpladePooling's per-wordpiece values over its unfolded sequence, so a long
document is not cut. ``truncate=True`` keeps only what sentence-transformers keeps.

Memory: the logits of a sub-batch are ``[tokens, vocabulary]`` in the model's dtype (8192
wordpieces against a 30k vocabulary is 1 GB in float32), so sub-batches are bounded by
``max_batch_tokens`` (default 2048), reduced segment by segment right away, and the inputs are
run a group at a time so that only ``max_inputs_per_group`` dense ``[vocabulary]`` rows exist at
once; only the non-zeros are kept (a ``scipy.sparse.csr_matrix``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.sparse
import torch
from transformers import AutoConfig

from embedder.batching import padded_groups
from embedder.cache import ModelSpec, cached_model, get_tokenizer
from embedder.devices import choose_dtype, host_to_device, resolve_device
from embedder.folded_batch import FoldedBatch
from embedder.folding import _segment_keep_ranges
from embedder.indexer import PretrainedTransformerIndexer, TruncationDirection
from embedder.lengths import resolve_max_length, usable_positions
from embedder.sentence_folder import (
    DEFAULT_PROMPTS,
    UnsupportedModelError,
    _join,
    check_folder,
    check_lowercasing,
    module_kwargs,
    read_json,
    read_prompts,
    resolve_prompt,
    transformer_settings,
)
from embedder.transformer_embedder import check_type_ids, number_of_token_type_embeddings, run_transformer

logger = logging.getLogger(__name__)

PoolingStrategy = Literal["max", "sum"]
Activation = Literal["relu", "log1p_relu"]
#: The masked-LM module's class names (``MLMTransformer``: sentence-transformers 5 and the legacy
#: name; ``Transformer``: 6, with ``transformer_task: fill-mask``).
MLM_MODULES = ("MLMTransformer", "Transformer")
SPARSE_MODULES = (*MLM_MODULES, "SpladePooling")
#: ``transformers`` class the masked-LM is loaded with (as sentence-transformers' fill-mask task).
MASKED_LM_CLASS = "AutoModelForMaskedLM"


@dataclass(frozen=True)
class SparseFolder:
    """What a SparseEncoder folder asks for.

    transformer_path: the masked-LM and its tokenizer. max_seq_length: the module's length, if set.
    pooling_strategy / activation_function: the SpladePooling module. max_active_dims: the model's
    default top-k (``None``: keep every non-zero). prompts / default_prompt_name: from
    ``config_sentence_transformers.json``. splade_route / static_routes / default_route: a ``Router``'s
    masked-LM route, its ``SparseStaticEmbedding`` routes (name -> module folder) and default route
    (inference-free SPLADE); ``None`` / empty for a plain SPLADE folder.
    """

    model_name: str
    transformer_path: str
    max_seq_length: int | None = None
    pooling_strategy: PoolingStrategy = "max"
    activation_function: Activation = "relu"
    max_active_dims: int | None = None
    prompts: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PROMPTS))
    default_prompt_name: str | None = None
    do_lower_case: bool = False
    tokenizer_kwargs: dict[str, Any] = field(default_factory=dict)
    config_kwargs: dict[str, Any] = field(default_factory=dict)
    splade_route: str | None = None
    static_routes: dict[str, str] = field(default_factory=dict)
    default_route: str | None = None

    @property
    def routes(self) -> tuple[str, ...]:
        """The routes a request may pick (``task``), for an inference-free (Router) folder; else none."""
        return () if self.splade_route is None else (self.splade_route, *self.static_routes)


def is_sparse_encoder_folder(model_name: str | Path) -> bool:
    """Whether sentence-transformers would load the folder as a ``SparseEncoder`` (``model_type:
    SparseEncoder`` in ``config_sentence_transformers.json`` beside a ``modules.json``)."""
    model_name = str(model_name)
    if read_json(model_name, "modules.json") is None:
        return False
    settings = read_json(model_name, "config_sentence_transformers.json") or {}
    return settings.get("model_type") == "SparseEncoder"


def is_masked_lm_folder(model_name: str | Path) -> bool:
    """Whether the folder is a plain ``*ForMaskedLM`` model (no sentence-transformers modules), which
    ``SparseEncoder(folder)`` reads as SPLADE (the masked-LM, then SpladePooling: max of ``log1p(relu)``),
    as TEI's ``--pooling splade`` does."""
    model_name = str(model_name)
    if read_json(model_name, "modules.json") is not None:
        return False
    config = read_json(model_name, "config.json")
    architectures = (config.get("architectures") or []) if isinstance(config, dict) else []
    return any(str(name).endswith("ForMaskedLM") for name in architectures)


def _module_name(model_name: str, entry: dict) -> str:
    kind = str(entry.get("type", ""))
    name = kind.rsplit(".", 1)[-1]
    if not kind.startswith("sentence_transformers.") or name not in SPARSE_MODULES:
        raise UnsupportedModelError(
            f"{model_name}: module {kind!r} (modules.json entry {entry.get('idx', '?')}, path "
            f"{entry.get('path', '')!r}) is not supported by embedding-cluster's sparse encoder, so its vectors "
            f"cannot be reproduced; supported: a masked-LM Transformer (MLMTransformer) then SpladePooling")
    return name


def _read_mlm_transformer(model_name: str, path: str, name: str) -> dict[str, Any]:
    config = transformer_settings(model_name, path)
    where = f"{model_name}/{path or '.'}"
    default_task = "fill-mask" if name == "MLMTransformer" else "feature-extraction"
    task = config.get("transformer_task", default_task)
    if task != "fill-mask":
        raise UnsupportedModelError(f"{where}: a {name} module with transformer_task {task!r} before SpladePooling "
                                    "(SPLADE needs the masked-LM logits, transformer_task 'fill-mask')")
    modalities = set(config.get("modality_config") or {"text": {}})
    if modalities != {"text"}:
        raise UnsupportedModelError(f"{where}: the Transformer takes {sorted(modalities)} inputs (only plain text)")
    for key in ("processing_kwargs", "query_expansion"):
        if config.get(key):
            raise UnsupportedModelError(f"{where}: {key} {config[key]!r} in the Transformer config is not supported")
    return config


def _router_routes(model_name: str, router_dir: str) -> tuple[dict[str, tuple[str, list[str], list[str]]], str | None]:
    """A ``Router``'s routes (name -> kind ``splade`` or ``static``, module class names, module paths)
    and its default route, from ``router_config.json``."""
    where = f"{model_name}/{_join(router_dir, 'router_config.json')}"
    config = read_json(model_name, _join(router_dir, "router_config.json"))
    if not isinstance(config, dict) or not isinstance(config.get("structure"), dict) or not config["structure"]:
        raise UnsupportedModelError(f"{where}: a Router without routes")
    types = config.get("types") or {}
    parameters = config.get("parameters") or {}
    if parameters.get("route_mappings"):
        raise UnsupportedModelError(f"{where}: Router route_mappings {parameters['route_mappings']!r} are not "
                                    "supported (only routes picked by their name, query / document)")
    routes = {}
    for route, paths in config["structure"].items():
        names = []
        for path in paths:
            kind = str(types.get(path, ""))
            name = kind.rsplit(".", 1)[-1]
            if not kind.startswith("sentence_transformers.") or name not in (*SPARSE_MODULES, "SparseStaticEmbedding"):
                raise UnsupportedModelError(
                    f"{model_name}: module {kind!r} (Router route {route!r}, path {path!r}) is not supported by "
                    "embedding-cluster's sparse encoder; supported routes: SparseStaticEmbedding, or a masked-LM "
                    "Transformer then SpladePooling")
            names.append(name)
        if names == ["SparseStaticEmbedding"]:
            kind = "static"
        elif len(names) == 2 and names[0] in MLM_MODULES and names[1] == "SpladePooling":
            kind = "splade"
        else:
            raise UnsupportedModelError(f"{where}: route {route!r} has modules {names}, not SparseStaticEmbedding "
                                        "nor a masked-LM Transformer then SpladePooling")
        routes[str(route)] = (kind, names, [_join(router_dir, str(path)) for path in paths])
    default = parameters.get("default_route")
    if default is None and parameters.get("allow_empty_key", True):
        default = next(iter(routes))
    if default is not None and default not in routes:
        raise UnsupportedModelError(f"{where}: default_route {default!r} is not one of its routes {sorted(routes)}")
    return routes, default


def read_sparse_folder(model_name: str | Path) -> SparseFolder:
    """What ``SparseEncoder(model_name)`` builds, as data; ``UnsupportedModelError`` for anything
    that cannot be reproduced. A ``Router`` (inference-free SPLADE) may have one masked-LM +
    SpladePooling route and any number of ``SparseStaticEmbedding`` routes; a plain ``*ForMaskedLM``
    folder is the masked-LM with SpladePooling's defaults (max, relu), as sentence-transformers reads it."""
    model_name = str(model_name)
    check_folder(model_name)
    if is_masked_lm_folder(model_name):
        return SparseFolder(model_name=model_name, transformer_path=model_name)
    modules = read_json(model_name, "modules.json")
    if not isinstance(modules, list) or not modules:
        raise UnsupportedModelError(f"{model_name}: no modules.json listing a SparseEncoder's modules, nor a "
                                    "*ForMaskedLM config.json")
    settings = read_json(model_name, "config_sentence_transformers.json") or {}
    model_type = settings.get("model_type", "SentenceTransformer")
    static_routes: dict[str, str] = {}
    splade_route = default_route = None
    if len(modules) == 1 and str(modules[0].get("type", "")).rsplit(".", 1)[-1] == "Router" and \
            str(modules[0].get("type", "")).startswith("sentence_transformers."):
        routes, default_route = _router_routes(model_name, str(modules[0].get("path", "")))
        splade = [route for route, (kind, _, _) in routes.items() if kind == "splade"]
        if len(splade) != 1:
            raise UnsupportedModelError(f"{model_name}: a Router with {len(splade)} masked-LM routes (one is supported)")
        splade_route = splade[0]
        _, names, paths = routes[splade_route]
        static_routes = {route: paths[0] for route, (kind, _, paths) in routes.items() if kind == "static"}
    else:
        names = [_module_name(model_name, entry) for entry in modules]
        if len(names) != 2 or names[0] not in MLM_MODULES or names[1] != "SpladePooling":
            raise UnsupportedModelError(f"{model_name}: modules {names} are not a masked-LM Transformer followed by "
                                        "SpladePooling (the only sparse encoder embedding-cluster reproduces)")
        paths = [str(entry.get("path", "")) for entry in modules]
    if model_type != "SparseEncoder":
        raise UnsupportedModelError(f"{model_name}: a {model_type} model, not a SparseEncoder")
    transformer_dir = paths[0]
    transformer = _read_mlm_transformer(model_name, transformer_dir, names[0])
    pooling_path = _join(paths[1], "config.json")
    pooling = read_json(model_name, pooling_path) or {}
    strategy = pooling.get("pooling_strategy", "max")
    activation = pooling.get("activation_function", "relu")
    if strategy not in ("max", "sum") or activation not in ("relu", "log1p_relu"):
        raise UnsupportedModelError(f"{model_name}/{pooling_path}: SpladePooling with pooling_strategy {strategy!r} "
                                    f"and activation_function {activation!r} (supported: max or sum, relu or "
                                    "log1p_relu)")
    if pooling.get("chunk_size"):
        logger.info("%s: SpladePooling's chunk_size only changes its memory, not its vectors", model_name)
    prompts, default_prompt_name = read_prompts(model_name, settings)
    max_active_dims = settings.get("max_active_dims")
    if max_active_dims is not None and (isinstance(max_active_dims, bool) or not isinstance(max_active_dims, int)
                                        or max_active_dims <= 0):
        raise UnsupportedModelError(f"{model_name}: max_active_dims {max_active_dims!r} is not a positive integer")
    transformer_path = model_name if not transformer_dir else str(Path(model_name) / transformer_dir)
    return SparseFolder(
        model_name=model_name,
        transformer_path=transformer_path,
        max_seq_length=transformer.get("max_seq_length"),
        pooling_strategy=strategy,
        activation_function=activation,
        max_active_dims=max_active_dims,
        prompts=prompts,
        default_prompt_name=default_prompt_name,
        do_lower_case=bool(transformer.get("do_lower_case", False)),
        tokenizer_kwargs=module_kwargs(transformer, "processor_kwargs", "tokenizer_args"),
        config_kwargs=module_kwargs(transformer, "config_kwargs", "config_args"),
        splade_route=splade_route,
        static_routes={route: (model_name if not path else str(Path(model_name) / path))
                       for route, path in static_routes.items()},
        default_route=default_route,
    )


def check_max_active_dims(value: int | None) -> int | None:
    """``None`` or a positive int (``ValueError`` otherwise), as sentence-transformers checks it."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0):
        raise ValueError(f"max_active_dims must be a positive integer, got {value!r}")
    return None if value is None else int(value)


def splade_activation(logits: torch.Tensor, activation_function: Activation) -> torch.Tensor:
    """SpladePooling's per-wordpiece values, in place: ``log1p(relu(x))``, with ``log1p`` once more
    for ``log1p_relu`` (its inference path, in the logits' dtype)."""
    values = logits.relu_().log1p_()
    return values.log1p_() if activation_function == "log1p_relu" else values


#: Tokens of a masked-LM sub-batch: its logits are [tokens, vocabulary] (2048 wordpieces against a 30k
#: vocabulary are 250 MB of float32), reduced before the next sub-batch runs.
LOGITS_BATCH_TOKENS = 2048
#: Rows of an inference-free route's answer made dense at once to keep their top-k.
STATIC_TOP_K_ROWS = 64


def top_k_rows(rows: torch.Tensor, k: int | None) -> torch.Tensor:
    """sentence-transformers' ``select_max_active_dims``: the ``k`` largest absolute values per row
    kept, the others zero (``torch.topk``, so that ties fall as they fall there)."""
    if k is None:
        return rows
    _, top = torch.topk(rows.abs(), k=min(k, rows.shape[-1]), dim=-1)
    selected = torch.zeros_like(rows)
    selected.scatter_(-1, top, rows.gather(-1, top))
    return selected


def to_csr(rows: torch.Tensor) -> scipy.sparse.csr_matrix:
    """Dense ``[n, vocab]`` rows -> their non-zeros as a float32 CSR matrix (column indices sorted)."""
    dense = rows.float().cpu()
    row_ids, columns = torch.nonzero(dense, as_tuple=True)
    values = dense[row_ids, columns].numpy()
    indptr = np.zeros(dense.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(row_ids.numpy(), minlength=dense.shape[0]), out=indptr[1:])
    return scipy.sparse.csr_matrix((values, columns.numpy().astype(np.int32), indptr), shape=tuple(dense.shape))


def input_groups(batch: FoldedBatch, max_group_tokens: int, max_inputs: int) -> list[tuple[int, int]]:
    """Consecutive ``[start, end)`` input ranges of at most ``max_inputs`` inputs and (unless one input
    alone has more) ``max_group_tokens`` tokens."""
    tokens_per_input = np.add.reduceat(batch.segment_lengths.astype(np.int64), batch.input_segment_starts()) \
        if batch.num_inputs else np.zeros(0, np.int64)
    groups, start, total = [], 0, 0
    for index, tokens in enumerate(tokens_per_input):
        if index > start and (index - start >= max_inputs or total + tokens > max_group_tokens):
            groups.append((start, index))
            start, total = index, 0
        total += int(tokens)
    if start < batch.num_inputs:
        groups.append((start, batch.num_inputs))
    return groups


def resolve_sparse_encoder(model_name: str | Path, max_length: int | None = None,
                           tokenizer_kwargs: dict[str, Any] | None = None) -> tuple[SparseFolder, int]:
    """A SparseEncoder folder read, and the length its inputs are folded at (``max_length`` overrides
    the folder's); ``UnsupportedModelError`` for what cannot be reproduced. No weights are loaded."""
    folder = read_sparse_folder(model_name)
    tokenizer = get_tokenizer(folder.transformer_path, **{**folder.tokenizer_kwargs, **(tokenizer_kwargs or {})})
    check_lowercasing(str(model_name), folder.do_lower_case, tokenizer)
    config = AutoConfig.from_pretrained(folder.transformer_path, **folder.config_kwargs)
    length = resolve_max_length(max_length, model_name=str(model_name), max_seq_length=folder.max_seq_length,
                                tokenizer=tokenizer, config=config)
    return folder, length


class SparseEncoderModel:
    """SPLADE vectors from a sentence-transformers ``SparseEncoder`` folder, equal to
    ``SparseEncoder(folder).encode`` on inputs that fit; longer inputs are folded (each segment
    encoded alone) and pooled over the unfolded sequence. Frozen, for inference; the weights come
    from the process-wide cache (``AutoModelForMaskedLM``)."""

    def __init__(
        self,
        model_name: str | Path,
        *,
        max_length: int | None = None,
        dtype: str | torch.dtype | None = "float32",
        device: str | None = "auto",
        tokenizer_kwargs: dict[str, Any] | None = None,
        transformer_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.folder, self.max_length = resolve_sparse_encoder(model_name, max_length, tokenizer_kwargs)
        folder = self.folder
        self.tokenizer_kwargs = {**folder.tokenizer_kwargs, **(tokenizer_kwargs or {})}
        self.transformer_kwargs = {**folder.config_kwargs, **(transformer_kwargs or {})}
        self.indexer = PretrainedTransformerIndexer(folder.transformer_path, max_length=self.max_length,
                                                    tokenizer_kwargs=self.tokenizer_kwargs or None)
        target = resolve_device(device)
        self.spec = ModelSpec.create(folder.transformer_path, dtype=choose_dtype(dtype, target),
                                     model_class=MASKED_LM_CLASS, **self.transformer_kwargs)
        self.model = cached_model(self.spec).to(target).eval()
        self.config = self.model.config
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.type_vocab_size = number_of_token_type_embeddings(self.config)
        self.max_positions = usable_positions(self.config)
        self.pad_token_id = self.indexer.pad_token_id
        self.static_routes = {route: StaticRoute.load(path, self.vocab_size)
                              for route, path in folder.static_routes.items()}

    @property
    def tokenizer(self):
        return self.indexer.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def pooling_strategy(self) -> PoolingStrategy:
        return self.folder.pooling_strategy

    def prompt(self, prompt_name: str | None = None, prompt: str | None = None) -> str | None:
        """The prompt text a request asks for (``ValueError`` for an unknown name or both fields)."""
        return resolve_prompt(self.folder.prompts, self.folder.default_prompt_name, prompt_name, prompt)

    def fold(self, texts: Sequence[str], *, truncate: bool = False,
             truncation_direction: TruncationDirection | None = None, prompt_name: str | None = None,
             prompt: str | None = None) -> FoldedBatch:
        """Tokenize and fold texts as ``encode`` does (the prompt before each text)."""
        return self.indexer.fold(list(texts), truncate=truncate, truncation_direction=truncation_direction,
                                 prompt=self.prompt(prompt_name, prompt))

    def route(self, task: str | None = None) -> str | None:
        """The route ``task`` picks (``None``: the folder's default route), as sentence-transformers'
        ``Router`` picks it by name; ``None`` for a folder without a Router. ``ValueError`` for an
        unknown route."""
        if not self.folder.routes:
            return None
        if task is None:
            if self.folder.default_route is None:
                raise ValueError(f"this model has routes {list(self.folder.routes)} and no default: give a task")
            return self.folder.default_route
        if task not in self.folder.routes:
            raise ValueError(f"unknown task {task!r}; this model's routes are {list(self.folder.routes)}")
        return task

    def encode_query(self, texts: str | Sequence[str], *, prompt_name: str | None = None,
                     prompt: str | None = None, **kwargs: Any) -> scipy.sparse.csr_matrix:
        """``SparseEncoder.encode_query``: the ``query`` prompt when the model has one, the ``query`` route."""
        if prompt_name is None and prompt is None and "query" in self.folder.prompts:
            prompt_name = "query"
        return self.encode(texts, prompt_name=prompt_name, prompt=prompt, task="query", **kwargs)

    def encode_document(self, texts: str | Sequence[str], *, prompt_name: str | None = None,
                        prompt: str | None = None, **kwargs: Any) -> scipy.sparse.csr_matrix:
        """``SparseEncoder.encode_document``: the first of the ``document``, ``passage`` and ``corpus``
        prompts the model has, the ``document`` route."""
        if prompt_name is None and prompt is None:
            prompt_name = next((name for name in ("document", "passage", "corpus") if name in self.folder.prompts),
                               None)
        return self.encode(texts, prompt_name=prompt_name, prompt=prompt, task="document", **kwargs)

    def encode(
        self,
        texts: str | Sequence[str],
        *,
        truncate: bool = False,
        truncation_direction: TruncationDirection | None = None,
        prompt_name: str | None = None,
        prompt: str | None = None,
        max_active_dims: int | None = None,
        task: str | None = None,
        max_batch_tokens: int = LOGITS_BATCH_TOKENS,
        max_inputs_per_group: int = 64,
    ) -> scipy.sparse.csr_matrix:
        """``[n, vocab]`` float32 sparse vectors (one row for one string), as
        ``SparseEncoder.encode(texts, prompt_name=..., prompt=..., max_active_dims=..., task=...)``.
        ``task`` picks a Router's route (a model without one ignores it, as sentence-transformers does)."""
        single = isinstance(texts, str)
        route = self.route(task)
        if not single and len(texts) == 0:
            return scipy.sparse.csr_matrix((0, self.vocab_size), dtype=np.float32)
        if route in self.static_routes:
            k = check_max_active_dims(max_active_dims)
            rows = self.static_routes[route].encode([texts] if single else list(texts),
                                                    self.prompt(prompt_name, prompt), truncate=truncate)
            k = self.folder.max_active_dims if k is None else k
            if k is None:
                return rows
            # a few rows at a time: never [inputs, vocabulary] dense at once
            return scipy.sparse.vstack([to_csr(top_k_rows(torch.from_numpy(rows[start:start + STATIC_TOP_K_ROWS]
                                                                             .toarray()), k))
                                        for start in range(0, rows.shape[0], STATIC_TOP_K_ROWS)], format="csr")
        batch = self.fold([texts] if single else texts, truncate=truncate, truncation_direction=truncation_direction,
                          prompt_name=prompt_name, prompt=prompt)
        return self.encode_folded(batch, max_active_dims=max_active_dims, max_batch_tokens=max_batch_tokens,
                                  max_inputs_per_group=max_inputs_per_group)

    def encode_folded(self, batch: FoldedBatch, *, max_active_dims: int | None = None,
                      max_batch_tokens: int = LOGITS_BATCH_TOKENS,
                      max_inputs_per_group: int = 64) -> scipy.sparse.csr_matrix:
        """The sparse vectors of an already folded batch (from ``fold``)."""
        k = check_max_active_dims(max_active_dims)
        k = self.folder.max_active_dims if k is None else k
        if batch.num_inputs == 0:
            return scipy.sparse.csr_matrix((0, self.vocab_size), dtype=np.float32)
        if int(batch.segment_lengths.max()) > self.max_length:
            raise ValueError(f"a segment is longer than the model's max_length {self.max_length}")
        type_ids = None if batch.type_ids is None else check_type_ids(torch.from_numpy(batch.type_ids),
                                                                     self.type_vocab_size)
        lo, hi = _segment_keep_ranges(batch)
        parts = []
        segment_starts = batch.input_segment_starts()
        segment_ends = segment_starts + batch.segments_per_input
        with torch.inference_mode():
            for start, end in input_groups(batch, max(max_batch_tokens, 1) * 4, max_inputs_per_group):
                rows = self._pool_inputs(batch, int(segment_starts[start]), int(segment_ends[end - 1]), start, end,
                                         lo, hi, type_ids, max_batch_tokens)
                parts.append(to_csr(top_k_rows(rows, k)))
        return scipy.sparse.vstack(parts, format="csr", dtype=np.float32)

    def _pool_inputs(self, batch: FoldedBatch, first_segment: int, last_segment: int, first_input: int,
                     last_input: int, lo: np.ndarray, hi: np.ndarray, type_ids: torch.Tensor | None,
                     max_batch_tokens: int) -> torch.Tensor:
        """``[inputs, vocab]`` float32 pooled rows of inputs ``[first_input, last_input)``, whose segments
        are ``[first_segment, last_segment)``; sub-batches of at most ``max_batch_tokens`` tokens."""
        device = self.device
        activation = self.folder.activation_function
        use_max = self.folder.pooling_strategy == "max"
        segments = np.arange(first_segment, last_segment)
        lengths = batch.segment_lengths[segments].astype(np.int64)
        starts = batch.segment_starts()[segments]
        owner = np.repeat(np.arange(last_input - first_input), batch.segments_per_input[first_input:last_input])
        token_ids = batch.token_ids.astype(np.int64)
        # every value is >= 0, so 0 is the neutral start for max as for sum; sums of segments are added
        # in float64, so that an input's vector does not depend on the order its segments ran in
        pooled = torch.zeros(last_input - first_input, self.vocab_size, device=device,
                             dtype=torch.float32 if use_max else torch.float64)
        host_types = None if type_ids is None else type_ids.numpy()
        for padded in padded_groups(lengths, starts, token_ids, host_types, self.pad_token_id, max_batch_tokens):
            group, positions, real, ids = padded.segments, padded.positions, padded.mask, padded.ids
            types = None if padded.types is None else host_to_device(padded.types, device)
            width = len(positions)
            if self.max_positions is not None and width > self.max_positions:
                raise ValueError(f"segments of {width} wordpieces are longer than the {self.max_positions} positions "
                                 f"of {self.folder.model_name}")
            logits = run_transformer(self.model, host_to_device(ids, device), host_to_device(real, device), types,
                                     all_layers=False)
            # the positions that make up the unfolded sequence (padding and inner specials out)
            keep = (positions[None, :] >= lo[segments[group]][:, None]) & (positions[None, :] < hi[segments[group]][:, None])
            # masked first, then relu and log1p in place, in SpladePooling's order
            logits.mul_(host_to_device(keep, device).unsqueeze(-1).to(logits.dtype))
            values = splade_activation(logits, activation)
            per_segment = (values.amax(dim=1) if use_max else values.sum(dim=1)).to(pooled.dtype)
            index = host_to_device(owner[group], device)
            if use_max:
                pooled.scatter_reduce_(0, index[:, None].expand_as(per_segment), per_segment, "amax")
            else:
                pooled.index_add_(0, index, per_segment)
            del logits, values
        return pooled.float()

    def decode(self, row: scipy.sparse.spmatrix | np.ndarray | torch.Tensor,
               top_k: int | None = None) -> list[tuple[str, float]]:
        """One vector's non-zero dimensions as ``(token, weight)``, largest weight first, at most
        ``top_k`` of them: ``SparseEncoder.decode`` for one embedding."""
        return decode_row(self.tokenizer, row, top_k)


@dataclass
class StaticRoute:
    """sentence-transformers' ``SparseStaticEmbedding`` (the query route of inference-free SPLADE): each
    token present in the text (its tokenizer, no special tokens) weighs its static weight."""

    tokenizer: Any
    weight: np.ndarray

    @classmethod
    def load(cls, path: str, vocab_size: int) -> "StaticRoute":
        from safetensors.torch import load_file

        files = [Path(path) / name for name in ("model.safetensors", "pytorch_model.bin")]
        found = next((file for file in files if file.exists()), None)
        if found is None:
            raise UnsupportedModelError(f"{path}: a SparseStaticEmbedding without model.safetensors")
        state = load_file(str(found)) if found.suffix == ".safetensors" else torch.load(found, weights_only=True)
        weight = state["weight"].float().numpy()
        if weight.shape != (vocab_size,):
            raise UnsupportedModelError(f"{path}: SparseStaticEmbedding weights of shape {weight.shape}, but the "
                                        f"masked-LM's vocabulary has {vocab_size} entries")
        return cls(tokenizer=get_tokenizer(path), weight=weight)

    def encode(self, texts: list[str], prompt: str | None, *, truncate: bool) -> scipy.sparse.csr_matrix:
        """``[n, vocab]`` rows; ``truncate``: only the tokenizer's ``model_max_length`` first tokens count,
        as sentence-transformers cuts them (else every token of the text)."""
        if prompt:
            texts = [prompt + text for text in texts]
        encoded = self.tokenizer(texts, add_special_tokens=False, truncation=truncate)["input_ids"]
        indptr, indices, values = [0], [], []
        for ids in encoded:
            present = np.unique(np.asarray(ids, dtype=np.int64))
            weights = self.weight[present]
            keep = weights != 0
            indices.append(present[keep])
            values.append(weights[keep])
            indptr.append(indptr[-1] + int(keep.sum()))
        return scipy.sparse.csr_matrix(
            (np.concatenate(values).astype(np.float32) if values else np.zeros(0, np.float32),
             np.concatenate(indices).astype(np.int32) if indices else np.zeros(0, np.int32), np.asarray(indptr)),
            shape=(len(texts), len(self.weight)))


def csr_rows(matrix: scipy.sparse.csr_matrix) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each row of a CSR matrix as ``(indices ascending, values)`` (int32 and float32 arrays)."""
    matrix.sort_indices()
    return [(matrix.indices[start:end].astype(np.int32), matrix.data[start:end].astype(np.float32))
            for start, end in zip(matrix.indptr[:-1], matrix.indptr[1:])]


#: The prompts ``SparseEncoder.encode_query`` / ``encode_document`` use when a call names none.
TASK_PROMPTS = {"query": ("query",), "document": ("document", "passage", "corpus")}


def task_prompt_name(prompts: dict[str, str], task: str | None, prompt_name: str | None,
                     prompt: str | None) -> str | None:
    """The prompt name a call gives, else (no prompt at all) the one ``SparseEncoder.encode_query``
    / ``encode_document`` use for its ``task``, if the model has it (``prompts``: its prompts)."""
    if prompt_name is None and prompt is None and task is not None:
        return next((key for key in TASK_PROMPTS[task] if key in prompts), None)
    return prompt_name


def sparse_row(row: scipy.sparse.spmatrix | np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, values)`` of one vector's non-zeros, indices ascending."""
    if scipy.sparse.issparse(row):
        row = scipy.sparse.csr_matrix(row)
        if row.shape[0] != 1:
            raise ValueError(f"one row expected, not {row.shape[0]}")
        row.sum_duplicates()
        row.eliminate_zeros()
        return row.indices.astype(np.int64), row.data.astype(np.float32)
    dense = row.to_dense().cpu().numpy() if isinstance(row, torch.Tensor) else np.asarray(row)
    dense = dense.reshape(-1)
    indices = np.flatnonzero(dense)
    return indices.astype(np.int64), dense[indices].astype(np.float32)


def top_entries(indices: np.ndarray, values: np.ndarray, top_k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The entries sorted by descending weight (``torch.topk`` / ``argsort`` as ``SparseEncoder.decode``),
    at most ``top_k`` of them."""
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be a positive integer, got {top_k}")
    if len(values) == 0:
        return indices, values
    weights = torch.from_numpy(np.ascontiguousarray(values))
    if top_k is not None and top_k < len(values):
        _, order = torch.topk(weights, top_k)
    else:
        order = torch.argsort(weights, descending=True)
    order = order.numpy()
    return indices[order], values[order]


def decode_row(tokenizer: Any, row: scipy.sparse.spmatrix | np.ndarray | torch.Tensor,
               top_k: int | None = None) -> list[tuple[str, float]]:
    """``SparseEncoder.decode`` of one vector with ``tokenizer``."""
    indices, values = top_entries(*sparse_row(row), top_k)
    return list(zip(tokenizer.convert_ids_to_tokens(indices.tolist()), values.tolist()))
