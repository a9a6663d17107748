"""Building a served model's indexer and encoder from its ``ModelConfig`` (serving and bulk alike)."""

from __future__ import annotations

import logging
import os

import ray
import torch
from ray import serve
from ray.serve.exceptions import RayServeException

from deployments.settings import ModelConfig
from deployments.weight_store import load_shared, release_user
from embedder.cache import cached_model, put_model
from embedder.devices import choose_dtype
from embedder.indexer import PretrainedTransformerIndexer
from embedder.sentence_encoder import SentenceEncoder

logger = logging.getLogger(__name__)


def load_indexer(model: ModelConfig) -> PretrainedTransformerIndexer:
    """The model's tokenizer and folding rule (tokenizers come from the process-wide cache)."""
    return model.sentence_settings().indexer()


def weights_holder(model: ModelConfig) -> tuple[str, str | None]:
    """Who holds a model's weights in the store, and its group: in a Serve replica, the replica
    (``app/deployment/replica``, so that each replica releases only its own hold when it stops)
    in the group of its deployment (``app/deployment``); else this process, in no group."""
    try:
        context = serve.get_replica_context()
    except RayServeException:
        return f"process-{os.getpid()}/{model.name}", None
    group = f"{context.app_name}/{context.deployment}"
    return f"{group}/{context.replica_tag}", group


def release_replica_weights(model: ModelConfig) -> None:
    """Release this Serve replica's hold on the weights of ``model`` (a stopping replica; nothing
    outside a replica, without Ray, or for a model that does not share its weights). Never raises:
    it runs in a destructor, maybe while Ray goes down with the process."""
    if not (model.share_weights and ray.is_initialized()):
        return
    try:
        serve.get_replica_context()
    except RayServeException:
        return
    try:
        release_user(weights_holder(model)[0])
    except Exception as error:
        logger.warning("could not release the weights of model %s (%s: %s)", model.name, type(error).__name__, error)


def placement(device: str, gpu_ids: list | None, cuda_available: bool) -> torch.device:
    """Where a model runs: an explicit ``device`` as is; ``auto`` in a Ray actor (``gpu_ids`` the GPUs
    Ray gave it) on CUDA only when Ray gave it a GPU, since Ray does not hide the node's GPUs from
    actors that asked for none; ``auto`` outside Ray (``gpu_ids`` ``None``) on CUDA when there is one."""
    if device != "auto":
        return torch.device(device)
    if gpu_ids is not None:
        return torch.device("cuda" if gpu_ids and cuda_available else "cpu")
    return torch.device("cuda" if cuda_available else "cpu")


def replica_device(model: ModelConfig) -> torch.device:
    """``placement`` for this process."""
    in_actor = ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    return placement(model.device, ray.get_gpu_ids() if in_actor else None, torch.cuda.is_available())


def prepare_device(model: ModelConfig, threads: int | None = None) -> tuple[torch.device, torch.dtype]:
    """Where and in what dtype this process runs ``model`` (``replica_device``; ``choose_dtype`` of its
    ``dtype``), with torch on ``threads`` threads on a CPU (default: the model's ``torch_threads``, else
    its ``num_cpus``), so that replicas sharing a machine do not oversubscribe its cores: the one
    set-up of every kind's serving head and bulk stage."""
    device = replica_device(model)
    if device.type == "cpu":
        torch.set_num_threads(threads or model.cpu_threads)
    return device, choose_dtype(model.dtype, device)


def concurrent_batches(model: ModelConfig, device: torch.device) -> int:
    """How many batches a replica runs at once, each on its own thread. On a CPU, two batches on
    one torch thread each beat one batch on two (bench corpus, 2 cores: 430 against 330-400
    short texts/s), and a core taken by request handling then stalls one batch, not both
    threads of one; a GPU runs one batch at a time."""
    if device.type != "cpu":
        return 1
    return model.concurrent_batches or min(2, model.cpu_threads)


def load_encoder(model: ModelConfig, threads: int | None = None,
                 user: str | None = None) -> tuple[SentenceEncoder, str]:
    """The frozen sentence encoder (transformer and pooling head) on its device (``replica_device``)
    in its dtype, and where its weights came from (``"store"``, ``"disk"``, ``"disk, no store"``).

    With ``share_weights`` and Ray running, the weights come through the cluster's
    weight store, held by ``user`` (default: ``weights_holder``, released again if the encoder
    cannot be built). On CPU, torch uses ``threads`` threads (default: the model's
    ``torch_threads``, else its ``num_cpus``), so that replicas sharing a machine do
    not oversubscribe its cores.
    """
    device, dtype = prepare_device(model, threads)
    source = "disk"
    own_user = None
    try:
        if model.share_weights and ray.is_initialized():
            spec = model.sentence_settings().transformer_spec(dtype, model.override_weights_file,
                                                              model.override_weights_strip_prefix)
            own_user, group = weights_holder(model) if user is None else (None, None)
            shared, source = load_shared(spec, lambda: cached_model(spec), user or own_user, group)
            put_model(spec, shared)
        encoder = SentenceEncoder(
            model.model_name,
            max_length=model.max_length,
            pooling=model.pooling,
            normalize=model.normalize,
            prompts=model.prompts,
            default_prompt_name=model.default_prompt_name,
            dtype=dtype,
            device=str(device),
            last_layer_only=model.last_layer_only,
            sub_module=model.sub_module,
            override_weights_file=model.override_weights_file,
            override_weights_strip_prefix=model.override_weights_strip_prefix,
            tokenizer_kwargs=model.tokenizer_kwargs,
            transformer_kwargs=model.transformer_kwargs,
        )
        if model.ranges is not None and model.ranges.dim != encoder.get_output_dim():
            raise ValueError(f"model {model.name!r}: its quantization ranges ({model.ranges.source}) cover "
                             f"{model.ranges.dim} dimensions, but its vectors have {encoder.get_output_dim()}")
    except BaseException:
        if own_user is not None:  # nobody would release a hold of an encoder that never started
            release_user(own_user)
        raise
    return encoder, source
