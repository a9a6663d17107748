"""AllenNLP's ``PretrainedTransformerMismatchedEmbedder``: one vector per word from pre-split words."""

from __future__ import annotations

from typing import Any

import torch

from embedder.transformer_embedder import PretrainedTransformerEmbedder
from embedder.word_pooling import SUB_TOKEN_MODES, SubTokenMode, pool_spans


class PretrainedTransformerMismatchedEmbedder(torch.nn.Module):
    """Embeds wordpieces with a ``PretrainedTransformerEmbedder``, then pools each
    word's span (``offsets`` from the indexer's ``words=`` mode) to one vector:
    ``avg`` of its wordpieces, or its ``first`` or ``last`` wordpiece."""

    def __init__(
        self,
        model_name: str,
        max_length: int | None = None,
        sub_module: str | None = None,
        train_parameters: bool = True,
        last_layer_only: bool = True,
        override_weights_file: str | None = None,
        override_weights_strip_prefix: str | None = None,
        gradient_checkpointing: bool | None = None,
        tokenizer_kwargs: dict[str, Any] | None = None,
        transformer_kwargs: dict[str, Any] | None = None,
        sub_token_mode: SubTokenMode = "avg",
    ) -> None:
        super().__init__()
        if sub_token_mode not in SUB_TOKEN_MODES:
            raise ValueError(f"Do not recognise sub_token_mode {sub_token_mode!r}; expected one of {SUB_TOKEN_MODES}")
        self._matched_embedder = PretrainedTransformerEmbedder(
            model_name,
            max_length=max_length,
            sub_module=sub_module,
            train_parameters=train_parameters,
            last_layer_only=last_layer_only,
            override_weights_file=override_weights_file,
            override_weights_strip_prefix=override_weights_strip_prefix,
            gradient_checkpointing=gradient_checkpointing,
            tokenizer_kwargs=tokenizer_kwargs,
            transformer_kwargs=transformer_kwargs,
        )
        self.sub_token_mode = sub_token_mode

    def get_output_dim(self) -> int:
        """The size of each word vector (the wordpiece embedder's)."""
        return self._matched_embedder.get_output_dim()

    def forward(
        self,
        token_ids: torch.Tensor,
        mask: torch.Tensor,
        offsets: torch.Tensor,
        wordpiece_mask: torch.Tensor,
        type_ids: torch.Tensor | None = None,
        segment_concat_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``offsets``: ``[batch, num_words, 2]`` inclusive spans -> ``[batch, num_words, dim]``."""
        embeddings = self._matched_embedder(token_ids, wordpiece_mask, type_ids=type_ids,
                                            segment_concat_mask=segment_concat_mask)
        return pool_spans(embeddings, offsets, self.sub_token_mode)
