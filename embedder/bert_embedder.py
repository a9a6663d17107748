"""AllenNLP 0.9's ``BertEmbedder`` family, on the project's cache, ScalarMix and windows."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from embedder.cache import get_model
from embedder.folding import bert_window_indices
from embedder.scalar_mix import ScalarMix
from embedder.transformer_embedder import run_transformer, train_keeping_frozen


class PretrainedBertModel:
    """Loads a BERT model once, so that several embedders can share it."""

    @classmethod
    def load(cls, model_name: str, cache_model: bool = True) -> PreTrainedModel:
        return get_model(model_name, make_copy=not cache_model)


class BertEmbedder(torch.nn.Module):
    """Wordpiece ids (windows of ``max_pieces`` concatenated, as the old BERT indexer
    made them) -> one vector per wordpiece, or per token with ``offsets``.

    ``top_layer_only`` gives the last layer, otherwise a ScalarMix of all layers;
    ``scalar_mix_parameters`` fixes (does not train) the mix weights.
    """

    def __init__(
        self,
        bert_model: PreTrainedModel,
        top_layer_only: bool = False,
        max_pieces: int = 512,
        num_start_tokens: int = 1,
        num_end_tokens: int = 1,
        scalar_mix_parameters: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.bert_model = bert_model
        self.output_dim = bert_model.config.hidden_size
        self.max_pieces = max_pieces
        self.num_start_tokens = num_start_tokens
        self.num_end_tokens = num_end_tokens
        self._scalar_mix = None if top_layer_only else ScalarMix(
            bert_model.config.num_hidden_layers,
            do_layer_norm=False,
            initial_scalar_parameters=scalar_mix_parameters,
            trainable=scalar_mix_parameters is None,
        )

    def get_output_dim(self) -> int:
        """The size of each output vector (the transformer's hidden size)."""
        return self.output_dim

    def _frozen(self) -> bool:
        return not any(p.requires_grad for p in self.bert_model.parameters())

    def train(self, mode: bool = True) -> "BertEmbedder":
        """``Module.train``, except that a frozen BERT stays in eval mode (dropout off)."""
        return train_keeping_frozen(self, mode, "bert_model", frozen=self._frozen())

    def _split_windows(self, tensor: torch.Tensor) -> torch.Tensor:
        pieces = list(tensor.split(self.max_pieces, dim=-1))
        pieces[-1] = F.pad(pieces[-1], pad=[0, self.max_pieces - pieces[-1].size(-1)], value=0)
        return torch.cat(pieces, dim=0)

    def forward(
        self,
        input_ids: torch.Tensor,
        offsets: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[batch, ..., seq_len]`` ids -> ``[batch, ..., seq_len, dim]``, or
        ``[batch, ..., num_tokens, dim]`` picking the wordpieces at ``offsets``."""
        initial_dims = list(input_ids.shape[:-1])
        full_seq_len = input_ids.size(-1)
        input_ids = input_ids.reshape(-1, full_seq_len)
        if token_type_ids is not None:
            token_type_ids = token_type_ids.reshape(-1, full_seq_len)
        batch_size = input_ids.size(0)
        needs_split = full_seq_len > self.max_pieces
        if needs_split:
            input_ids = self._split_windows(input_ids)
            if token_type_ids is not None:
                token_type_ids = self._split_windows(token_type_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        input_mask = (input_ids != 0).long()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self._frozen()):
            layers = run_transformer(self.bert_model, input_ids, input_mask, token_type_ids, all_layers=True)
        all_layers = torch.stack(layers)
        if needs_split:
            unpacked = torch.cat(torch.split(all_layers, batch_size, dim=1), dim=2)
            select = bert_window_indices(full_seq_len, self.max_pieces, self.num_start_tokens, self.num_end_tokens)
            all_layers = unpacked[:, :, select]
        mix = all_layers[-1] if self._scalar_mix is None else self._scalar_mix(list(all_layers))
        if offsets is None:
            return mix.reshape(*initial_dims, mix.size(1), mix.size(2))
        offsets2d = offsets.reshape(-1, offsets.size(-1))
        rows = torch.arange(offsets2d.size(0), device=mix.device).unsqueeze(1)
        selected = mix[rows, offsets2d]
        return selected.reshape(*offsets.shape, selected.size(-1))


class PretrainedBertEmbedder(BertEmbedder):
    """A ``BertEmbedder`` for a named or local pretrained model, loaded through the
    shared cache; ``requires_grad=True`` fine-tunes its own copy of the weights."""

    def __init__(
        self,
        pretrained_model: str,
        requires_grad: bool = False,
        top_layer_only: bool = False,
        scalar_mix_parameters: Sequence[float] | None = None,
    ) -> None:
        model = PretrainedBertModel.load(pretrained_model, cache_model=not requires_grad)
        for parameter in model.parameters():
            parameter.requires_grad = requires_grad
        super().__init__(bert_model=model, top_layer_only=top_layer_only,
                         scalar_mix_parameters=scalar_mix_parameters)
        if not requires_grad:
            self.bert_model.eval()
