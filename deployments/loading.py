"""Building a served model's indexer and embedder from its ``ModelConfig`` (serving and bulk alike)."""

from __future__ import annotations

import torch

from deployments.settings import ModelConfig
from embedder.devices import choose_dtype, resolve_device
from embedder.indexer import PretrainedTransformerIndexer
from embedder.transformer_embedder import PretrainedTransformerEmbedder


def load_indexer(model: ModelConfig) -> PretrainedTransformerIndexer:
    """The model's tokenizer and folding rule (tokenizers come from the process-wide cache)."""
    return PretrainedTransformerIndexer(model.model_name, max_length=model.max_length,
                                        tokenizer_kwargs=model.tokenizer_kwargs or None)


def load_embedder(model: ModelConfig, threads: int | None = None) -> PretrainedTransformerEmbedder:
    """The frozen embedder on its device (CUDA when this process sees a GPU) in its dtype.

    On CPU, torch uses ``threads`` threads (default: the model's ``torch_threads``, else its
    ``num_cpus``), so that replicas sharing a machine do not oversubscribe its cores.
    """
    device = resolve_device(model.device)
    if device.type == "cpu":
        torch.set_num_threads(threads or model.torch_threads or max(1, int(round(model.num_cpus))))
    return PretrainedTransformerEmbedder(
        model.model_name,
        transformer_kwargs={**model.transformer_kwargs, "dtype": choose_dtype(model.dtype, device)},
        **model.embedder_kwargs(),
    ).to(device)
