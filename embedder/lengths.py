"""How many wordpieces a model takes in one segment: its own length, and what its positions allow."""

from __future__ import annotations

from transformers import PretrainedConfig
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

#: Models whose position ids start after the padding index (RoBERTa's offset): they can
#: use ``max_position_embeddings - pad_token_id - 1`` positions.
PADDING_OFFSET_MODEL_TYPES = frozenset({
    "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "mpnet", "longformer", "data2vec-text", "ibert",
    "luke", "roberta-prelayernorm", "markuplm", "xmod", "esm", "bridgetower", "ernie_m",
})
#: Tokenizers without a length say ``model_max_length`` is about 1e30; anything this large means "unset".
UNSET_TOKENIZER_LENGTH = 10**9
#: The length of a model that states none anywhere (relative positions, no tokenizer length).
FALLBACK_MAX_LENGTH = 512


def usable_positions(config: PretrainedConfig) -> int | None:
    """Positions the model's position embeddings cover, ``None`` for models without absolute
    positions (T5's relative attention)."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return None
    if config.model_type in PADDING_OFFSET_MODEL_TYPES:
        limit -= int(getattr(config, "pad_token_id", None) or 0) + 1
    return limit


def tokenizer_max_length(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The tokenizer's ``model_max_length`` when it is a real number."""
    length = getattr(tokenizer, "model_max_length", None)
    return int(length) if isinstance(length, (int, float)) and 0 < length < UNSET_TOKENIZER_LENGTH else None


def resolve_max_length(requested: int | None, *, model_name: str, max_seq_length: int | None,
                       tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig) -> int:
    """A model's segment length: ``requested`` if given, else the sentence-transformers folder's
    ``max_seq_length``, else the tokenizer's ``model_max_length`` (capped at the positions, as
    sentence-transformers caps it), else the positions the model can use, else 512.

    A length past the model's positions raises ``ValueError`` naming both numbers.
    """
    positions = usable_positions(config)
    if requested is not None:
        length, source = requested, "max_length"
    elif max_seq_length is not None:
        length, source = int(max_seq_length), "the folder's max_seq_length"
    else:
        from_tokenizer = tokenizer_max_length(tokenizer)
        if from_tokenizer is not None:
            return from_tokenizer if positions is None else min(from_tokenizer, positions)
        return positions or FALLBACK_MAX_LENGTH
    if positions is not None and length > positions:
        raise ValueError(f"{model_name}: {source} {length} is more than the {positions} positions its "
                         f"position embeddings allow; set max_length to {positions} or less")
    return length
