"""The special tokens a tokenizer puts around one sequence, found once per tokenizer.

Like AllenNLP's ``PretrainedTransformerTokenizer``, this reverse-engineers the
tokenizer's own template by encoding a probe with and without special tokens,
so folding adds to each segment exactly what the tokenizer would add.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

_PROBE = "a b c"


def _find_sublist(haystack: list[int], needle: list[int]) -> int:
    for start in range(len(haystack) - len(needle) + 1):
        if haystack[start:start + len(needle)] == needle:
            return start
    raise ValueError("the tokenizer's special-token template could not be determined")


@dataclass(frozen=True)
class SpecialTokens:
    """Ids and type ids a tokenizer adds before and after a single sequence."""

    start_ids: tuple[int, ...]
    end_ids: tuple[int, ...]
    start_type_ids: tuple[int, ...]
    end_type_ids: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> "SpecialTokens":
        plain = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
        full = tokenizer(_PROBE, add_special_tokens=True, return_token_type_ids=True)
        ids = full["input_ids"]
        type_ids = full.get("token_type_ids") or [0] * len(ids)
        start = _find_sublist(ids, plain)
        end = start + len(plain)
        return cls(
            start_ids=tuple(ids[:start]),
            end_ids=tuple(ids[end:]),
            start_type_ids=tuple(type_ids[:start]),
            end_type_ids=tuple(type_ids[end:]),
        )

    @property
    def num_start(self) -> int:
        return len(self.start_ids)

    @property
    def num_end(self) -> int:
        return len(self.end_ids)

    @property
    def num_added(self) -> int:
        return self.num_start + self.num_end
