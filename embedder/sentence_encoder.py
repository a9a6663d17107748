"""``SentenceEncoder``: a model folder encoding texts as ``SentenceTransformer(folder).encode`` does.

The folder's pooling, Dense / LayerNorm / Normalize modules, prompts and
length are honoured (``embedder.sentence_folder``); inputs longer than
``max_length`` are folded AllenNLP's way instead of cut, unless ``truncate``.
``resolve_sentence_settings`` is the one place that merges a folder with the
caller's overrides: the serving cluster's tokenizer and encoder replicas both
call it, so they agree on the length, the prompts and the pooling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig

from embedder.cache import ModelSpec, get_tokenizer
from embedder.chunking import DEFAULT_CHUNK_SIZE
from embedder.devices import choose_dtype, resolve_device
from embedder.indexer import PretrainedTransformerIndexer, TruncationDirection
from embedder.inference import encode_folded
from embedder.lengths import resolve_max_length
from embedder.sentence_folder import (
    SentenceFolder,
    check_lowercasing,
    read_sentence_folder,
    resolve_prompt,
)
from embedder.sentence_head import SentenceHead
from embedder.sentence_pooling import check_pooling_modes
from embedder.transformer_embedder import PretrainedTransformerEmbedder, transformer_spec



@dataclass(frozen=True)
class SentenceSettings:
    """A sentence model once its folder and the caller's overrides are merged."""

    folder: SentenceFolder
    max_length: int
    pooling_modes: tuple[str, ...]
    normalize: bool
    prompts: dict[str, str]
    default_prompt_name: str | None
    tokenizer_kwargs: dict[str, Any]
    transformer_kwargs: dict[str, Any]
    vocab_size: int | None = None

    def indexer(self) -> PretrainedTransformerIndexer:
        """The tokenizer and folding rule of this model (token ids checked against its embedding matrix)."""
        return PretrainedTransformerIndexer(self.folder.transformer_path, max_length=self.max_length,
                                            tokenizer_kwargs=self.tokenizer_kwargs or None,
                                            vocab_size=self.vocab_size)

    def prompt(self, prompt_name: str | None = None, prompt: str | None = None) -> str | None:
        """The prompt text a request asks for (``ValueError`` for an unknown name or both fields)."""
        return resolve_prompt(self.prompts, self.default_prompt_name, prompt_name, prompt)

    def transformer_spec(self, dtype: torch.dtype | None, override_weights_file: str | None = None,
                         override_weights_strip_prefix: str | None = None) -> ModelSpec:
        """The weight-cache key of this model's transformer in ``dtype``."""
        return transformer_spec(self.folder.transformer_path, {**self.transformer_kwargs, "dtype": dtype},
                                override_weights_file, override_weights_strip_prefix, self.folder.model_class)


def resolve_sentence_settings(
    model_name: str,
    *,
    max_length: int | None = None,
    pooling: str | Sequence[str] | None = None,
    normalize: bool | None = None,
    prompts: dict[str, str] | None = None,
    default_prompt_name: str | None = None,
    tokenizer_kwargs: dict[str, Any] | None = None,
    transformer_kwargs: dict[str, Any] | None = None,
) -> SentenceSettings:
    """Read the folder of ``model_name`` and apply the caller's overrides (``None``: the folder's).

    ``prompts`` add to or replace the folder's; ``default_prompt_name=""`` turns the folder's
    default prompt off. Raises ``UnsupportedModelError`` (a ``ValueError``) naming the folder
    for what cannot be honoured, and ``ValueError`` for a ``max_length`` past the positions.
    """
    folder = read_sentence_folder(model_name)
    tokenizer_kwargs = {**folder.tokenizer_kwargs, **(tokenizer_kwargs or {})}
    transformer_kwargs = {**folder.config_kwargs, **(transformer_kwargs or {})}
    tokenizer = get_tokenizer(folder.transformer_path, **tokenizer_kwargs)
    check_lowercasing(model_name, folder.do_lower_case, tokenizer)
    config = AutoConfig.from_pretrained(folder.transformer_path, **folder.config_kwargs)
    length = resolve_max_length(max_length, model_name=model_name, max_seq_length=folder.max_seq_length,
                                tokenizer=tokenizer, config=config)
    merged_prompts = {**folder.prompts, **(prompts or {})}
    default = folder.default_prompt_name if default_prompt_name is None else (default_prompt_name or None)
    if default is not None and default not in merged_prompts:
        raise ValueError(f"{model_name}: default_prompt_name {default!r} is not one of its prompts "
                         f"{sorted(merged_prompts)}")
    return SentenceSettings(
        folder=folder,
        max_length=length,
        pooling_modes=folder.pooling_modes if pooling is None else check_pooling_modes(pooling),
        normalize=folder.normalizes if normalize is None else normalize,
        prompts=merged_prompts,
        default_prompt_name=default,
        tokenizer_kwargs=tokenizer_kwargs,
        transformer_kwargs=transformer_kwargs,
        vocab_size=getattr(config, "vocab_size", None),
    )


class SentenceEncoder(torch.nn.Module):
    """Sentence vectors from a sentence-transformers folder (or any ``transformers`` model,
    mean-pooled), equal to ``SentenceTransformer(folder).encode`` on inputs that fit; longer
    inputs are folded into ``max_length`` segments and pooled over the unfolded sequence.

    Frozen, for inference. Every option left ``None`` comes from the folder; the weights come
    from the process-wide cache. ``embedder`` and ``head`` are the wordpiece embedder and the
    pooling head, for use inside a larger model.
    """

    def __init__(
        self,
        model_name: str,
        *,
        max_length: int | None = None,
        pooling: str | Sequence[str] | None = None,
        normalize: bool | None = None,
        prompts: dict[str, str] | None = None,
        default_prompt_name: str | None = None,
        dtype: str | torch.dtype | None = "float32",
        device: str | None = "auto",
        last_layer_only: bool = True,
        sub_module: str | None = None,
        override_weights_file: str | None = None,
        override_weights_strip_prefix: str | None = None,
        tokenizer_kwargs: dict[str, Any] | None = None,
        transformer_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.settings = resolve_sentence_settings(
            model_name, max_length=max_length, pooling=pooling, normalize=normalize, prompts=prompts,
            default_prompt_name=default_prompt_name, tokenizer_kwargs=tokenizer_kwargs,
            transformer_kwargs=transformer_kwargs)
        settings = self.settings
        target = resolve_device(device)
        self.indexer = settings.indexer()
        self.embedder = PretrainedTransformerEmbedder(
            settings.folder.transformer_path,
            max_length=settings.max_length,
            sub_module=sub_module,
            train_parameters=False,
            last_layer_only=last_layer_only,
            override_weights_file=override_weights_file,
            override_weights_strip_prefix=override_weights_strip_prefix,
            tokenizer_kwargs=settings.tokenizer_kwargs or None,
            transformer_kwargs={**settings.transformer_kwargs, "dtype": choose_dtype(dtype, target)},
            model_class=settings.folder.model_class,
        ).to(target)
        self.head = SentenceHead.from_folder(settings.folder, self.embedder.get_output_dim(),
                                             settings.pooling_modes, settings.normalize).to(target)

    def get_output_dim(self) -> int:
        """The dimension of a sentence vector (the last module's)."""
        return self.head.get_output_dim()

    def encode(
        self,
        texts: str | Sequence[str],
        *,
        prompt_name: str | None = None,
        prompt: str | None = None,
        truncate: bool = False,
        truncation_direction: TruncationDirection | None = None,
        pooling: str | Sequence[str] | None = None,
        normalize: bool | None = None,
        max_batch_tokens: int = 16384,
    ) -> np.ndarray:
        """``[n, dim]`` float32 sentence vectors (``[dim]`` for one string), as
        ``SentenceTransformer.encode(texts, prompt_name=..., prompt=...)`` gives them."""
        single = isinstance(texts, str)
        batch = self.indexer.fold([texts] if single else list(texts), truncate=truncate,
                                  truncation_direction=truncation_direction,
                                  prompt=self.settings.prompt(prompt_name, prompt))
        vectors = encode_folded(self.embedder, batch, head=self.head, pooling=pooling, normalize=normalize,
                                max_batch_tokens=max_batch_tokens)
        return vectors[0] if single else vectors

    def encode_chunks(
        self,
        texts: Sequence[str],
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        chunk_overlap: int = 0,
        spans: Sequence[Sequence[tuple[int, int]]] | None = None,
        prompt_name: str | None = None,
        prompt: str | None = None,
        pooling: str | None = None,
        normalize: bool | None = None,
        max_batch_tokens: int = 16384,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Late chunking: per document, its chunks ``[n, 3]`` (start and end characters, wordpieces)
        and their vectors ``[n, dim]``, each the mean of its own wordpieces from the whole document's
        encoding, then the model's modules after pooling. Needs a mean-pooling model, or
        ``pooling="mean"`` to chunk another one anyway."""
        modes = check_pooling_modes(pooling) if pooling is not None else self.head.pooling_modes
        if modes != ("mean",):
            raise ValueError(f"late chunking averages each chunk's wordpieces, but this model pools with "
                             f"{'+'.join(modes)}; pass pooling='mean' to chunk it anyway")
        batch = self.indexer.fold_chunks(list(texts), chunk_size=chunk_size, chunk_overlap=chunk_overlap, spans=spans,
                                         prompt=self.settings.prompt(prompt_name, prompt))
        vectors = encode_folded(self.embedder, batch, level="chunk", head=self.head, normalize=normalize,
                                max_batch_tokens=max_batch_tokens)
        return list(zip(batch.chunk_table(), vectors))
