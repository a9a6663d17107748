"""Building a served model's indexer and encoder from its ``ModelConfig`` (serving and bulk alike)."""

from __future__ import annotations

import os

import ray
import torch
from ray import serve
from ray.serve.exceptions import RayServeException

from deployments.settings import ModelConfig
from deployments.weight_store import load_shared
from embedder.cache import cached_model, put_model
from embedder.devices import choose_dtype
from embedder.indexer import PretrainedTransformerIndexer
from embedder.sentence_encoder import SentenceEncoder


def load_indexer(model: ModelConfig) -> PretrainedTransformerIndexer:
    """The model's tokenizer and folding rule (tokenizers come from the process-wide cache)."""
    return model.sentence_settings().indexer()


def weights_user(model: ModelConfig) -> str:
    """Who holds a model's weights in the store: the Serve deployment this process is a replica of,
    else this process."""
    try:
        context = serve.get_replica_context()
    except RayServeException:
        return f"process-{os.getpid()}/{model.name}"
    return f"{context.app_name}/{context.deployment}"


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
    weight store, held by ``user`` (default: ``weights_user``). On CPU, torch uses ``threads`` threads (default: the model's
    ``torch_threads``, else its ``num_cpus``), so that replicas sharing a machine do
    not oversubscribe its cores.
    """
    device = replica_device(model)
    if device.type == "cpu":
        torch.set_num_threads(threads or model.cpu_threads)
    dtype = choose_dtype(model.dtype, device)
    source = "disk"
    if model.share_weights and ray.is_initialized():
        spec = model.sentence_settings().transformer_spec(dtype, model.override_weights_file,
                                                          model.override_weights_strip_prefix)
        shared, source = load_shared(spec, lambda: cached_model(spec), user or weights_user(model))
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
    return encoder, source
