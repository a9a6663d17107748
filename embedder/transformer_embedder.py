"""AllenNLP's ``PretrainedTransformerEmbedder``: wordpiece ids -> one vector per wordpiece."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PretrainedConfig, XLNetConfig

from embedder.cache import ModelSpec, cached_model, get_tokenizer
from embedder.folding import fold_padded, unfold_padded
from embedder.lengths import usable_positions
from embedder.scalar_mix import ScalarMix
from embedder.special_tokens import SpecialTokens


def number_of_token_type_embeddings(config: PretrainedConfig) -> int:
    """How many type ids the model accepts (0 when it has no type embeddings)."""
    if isinstance(config, XLNetConfig):
        return 3
    return int(getattr(config, "type_vocab_size", 0) or 0)


def check_type_ids(type_ids: torch.Tensor | None, type_vocab_size: int) -> torch.Tensor | None:
    """All-zero type ids are dropped (not every model takes them); a type id the
    model has no embedding for raises ``ValueError``."""
    if type_ids is None or type_ids.numel() == 0:
        return None
    max_type_id = int(type_ids.max())
    if max_type_id == 0:
        return None
    if max_type_id >= type_vocab_size or int(type_ids.min()) < 0:
        raise ValueError(
            f"Found type ids too large for the chosen transformer model: type id {max_type_id}, "
            f"but the model has {type_vocab_size} token type embeddings"
        )
    return type_ids


def run_transformer(
    model: torch.nn.Module,
    token_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    type_ids: torch.Tensor | None,
    all_layers: bool,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Call a transformer by keyword (some reject ``token_type_ids=None``).

    Returns the last hidden state, or with ``all_layers`` every layer's output
    except the embedding layer's.
    """
    parameters: dict[str, Any] = {"input_ids": token_ids, "attention_mask": attention_mask.long()}
    if type_ids is not None:
        parameters["token_type_ids"] = type_ids
    if all_layers:
        return tuple(model(**parameters, output_hidden_states=True).hidden_states[1:])
    return model(**parameters)[0]


def transformer_spec(model_name: str, transformer_kwargs: dict[str, Any] | None = None,
                     override_weights_file: str | None = None,
                     override_weights_strip_prefix: str | None = None,
                     model_class: str | None = None) -> ModelSpec:
    """The weight-cache key of the transformer that ``PretrainedTransformerEmbedder`` loads
    for these arguments (``dtype`` or ``torch_dtype`` in ``transformer_kwargs`` is the dtype;
    float32 when neither is given, as AllenNLP loads, not the checkpoint's saved dtype)."""
    load_kwargs = dict(transformer_kwargs or {})
    dtype = load_kwargs.pop("dtype", None)
    return ModelSpec.create(model_name, override_weights_file=override_weights_file,
                            override_weights_strip_prefix=override_weights_strip_prefix,
                            dtype=dtype, model_class=model_class, **load_kwargs)


def set_activation_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """Turn gradient (activation) checkpointing on or off through the current
    transformers API (``activation_checkpointing_*``, formerly ``gradient_checkpointing_*``)."""
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    if enabled:
        getattr(model, f"{prefix}_checkpointing_enable")(
            **{f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}})
    else:
        getattr(model, f"{prefix}_checkpointing_disable")()


def train_keeping_frozen(module: torch.nn.Module, mode: bool, frozen_child: str, frozen: bool) -> torch.nn.Module:
    """``Module.train`` that leaves a frozen child in eval mode (dropout off)."""
    module.training = mode
    for name, child in module.named_children():
        child.train(mode and not (frozen and name == frozen_child))
    return module


class PretrainedTransformerEmbedder(torch.nn.Module):
    """Uses a pretrained ``transformers`` model as a token embedder.

    ``max_length`` folds long inputs (as the indexer with the same ``max_length``
    lays them out) and unfolds the output; ``last_layer_only=False`` mixes all
    layers with a ``ScalarMix``; ``train_parameters=False`` freezes the
    transformer and keeps it in eval mode. ``model_class`` names a ``transformers``
    class to load instead of ``AutoModel`` (e.g. ``T5EncoderModel``).
    """

    def __init__(
        self,
        model_name: str,
        *,
        max_length: int | None = None,
        sub_module: str | None = None,
        train_parameters: bool = True,
        last_layer_only: bool = True,
        override_weights_file: str | None = None,
        override_weights_strip_prefix: str | None = None,
        gradient_checkpointing: bool | None = None,
        tokenizer_kwargs: dict[str, Any] | None = None,
        transformer_kwargs: dict[str, Any] | None = None,
        model_class: str | None = None,
    ) -> None:
        super().__init__()
        model = cached_model(
            transformer_spec(model_name, transformer_kwargs, override_weights_file, override_weights_strip_prefix,
                             model_class),
            make_copy=train_parameters or gradient_checkpointing is not None,
        )
        if gradient_checkpointing is not None:
            set_activation_checkpointing(model, gradient_checkpointing)
        self.config = model.config
        if sub_module:
            if not hasattr(model, sub_module):
                raise ValueError(f"{type(model).__name__} has no sub-module {sub_module!r}")
            model = getattr(model, sub_module)
        self.transformer_model = model
        self.model_name = str(model_name)
        self._max_length = max_length
        self.output_dim = self.config.hidden_size
        self._scalar_mix = None if last_layer_only else ScalarMix(self.config.num_hidden_layers)
        tokenizer = get_tokenizer(model_name, **(tokenizer_kwargs or {}))
        self.special_tokens = SpecialTokens.from_tokenizer(tokenizer)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.type_vocab_size = number_of_token_type_embeddings(self.config)
        self.max_positions = usable_positions(self.config)
        self.train_parameters = train_parameters
        for parameter in self.transformer_model.parameters():
            parameter.requires_grad = train_parameters
        if not train_parameters:
            self.transformer_model.eval()

    def get_output_dim(self) -> int:
        """The size of each output vector: the transformer's hidden size (of the ``sub_module`` when set)."""
        return self.output_dim

    @property
    def max_length(self) -> int | None:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return next(self.transformer_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer_model.parameters()).dtype

    def train(self, mode: bool = True) -> "PretrainedTransformerEmbedder":
        """``Module.train``, except that with ``train_parameters=False`` the transformer stays in eval
        mode (dropout off), as AllenNLP's does, even when a parent module calls ``.train()``."""
        return train_keeping_frozen(self, mode, "transformer_model", frozen=not self.train_parameters)

    def encode_segments(
        self, token_ids: torch.Tensor, attention_mask: torch.Tensor, type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run the transformer on ``[segments, length]`` ids: ``[segments, length, dim]``,
        the last layer or the scalar mix of all layers. Type ids must be checked already. A segment
        longer than the positions the model has is a ``ValueError`` here (on a GPU it would be a
        device-side assert that breaks the process's CUDA context)."""
        if self.max_positions is not None and token_ids.size(1) > self.max_positions:
            raise ValueError(f"segments of {token_ids.size(1)} wordpieces are longer than the "
                             f"{self.max_positions} positions of {self.model_name}; fold them (max_length)")
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_parameters):
            output = run_transformer(self.transformer_model, token_ids, attention_mask, type_ids,
                                     all_layers=self._scalar_mix is not None)
        return output if self._scalar_mix is None else self._scalar_mix(output)

    def forward(
        self,
        token_ids: torch.Tensor,
        mask: torch.Tensor,
        type_ids: torch.Tensor | None = None,
        segment_concat_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[batch, num_wordpieces or num_segment_concat_wordpieces]`` ids (the
        indexer's layout) -> ``[batch, num_wordpieces, dim]``."""
        type_ids = check_type_ids(type_ids, self.type_vocab_size)
        if type_ids is not None and type_ids.shape != token_ids.shape:
            raise ValueError(f"type_ids shape {tuple(type_ids.shape)} differs from token_ids "
                             f"shape {tuple(token_ids.shape)}")
        fold = self._max_length is not None and token_ids.size(1) > self._max_length
        transformer_mask = segment_concat_mask if self._max_length is not None else mask
        if transformer_mask is None:
            raise ValueError("segment_concat_mask is required when max_length is set")
        batch_size = token_ids.size(0)
        if fold:
            token_ids, transformer_mask, type_ids = fold_padded(token_ids, transformer_mask, type_ids,
                                                                self._max_length)
        embeddings = self.encode_segments(token_ids, transformer_mask, type_ids)
        if fold:
            embeddings = unfold_padded(embeddings, transformer_mask, batch_size,
                                       self.special_tokens.num_start, self.special_tokens.num_end)
        return embeddings
