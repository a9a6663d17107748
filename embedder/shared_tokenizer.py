"""A tokenizer that many threads may call at once, each getting exactly its lone answer.

Hugging Face's fast tokenizers keep their truncation and padding settings on the
one Rust object they wrap, and every call sets them anew for its own arguments
(``PreTrainedTokenizerFast.set_truncation_and_padding``) before it encodes, with
the GIL released. Two threads calling the same tokenizer therefore change each
other's answers: a text asked for whole comes back cut to another call's
``max_length``, a pair asked to be cut comes back whole, and the Rust side raises
``RuntimeError: Already borrowed`` when one thread resets the settings while
another encodes.

The rule this module enforces: **the tokenizer that is shared is never called**.
``SharedTokenizer`` keeps the loaded tokenizer as a template that nothing
tokenizes with, and gives each thread its own deep copy of it, made once, on the
thread's first use. A copy is only ever used by its own thread, so the settings a
call sets are the ones it encodes with. Settings that callers would otherwise
flip on the shared object (``truncation_side``) are variants made once from the
template (``with_truncation_side``), never assignments. Setting an attribute on
a ``SharedTokenizer`` raises.

This module imports neither torch nor transformers.
"""

from __future__ import annotations

import copy
import threading
from typing import Any

#: Prompts whose tokenization a tokenizer's user keeps (a request may bring any prompt: caches stay bounded).
PROMPT_CACHE_SIZE = 256

_OWN_ATTRIBUTES = ("_template", "_local", "_lock", "_variants")


class SharedTokenizer:
    """A loaded tokenizer, safe to share between threads.

    Calls and attribute reads go to the calling thread's own copy of ``template``
    (a Hugging Face ``PreTrainedTokenizerBase``), so the object behaves as the
    tokenizer does, whatever other threads are tokenizing at the same time.

    Parameters
    ----------
    template : ``PreTrainedTokenizerBase``
        The tokenizer as loaded. It is only ever deep-copied (under a lock), never called.
    """

    __slots__ = _OWN_ATTRIBUTES

    def __init__(self, template: Any) -> None:
        object.__setattr__(self, "_template", template)
        object.__setattr__(self, "_local", threading.local())
        object.__setattr__(self, "_lock", threading.Lock())
        object.__setattr__(self, "_variants", {})

    def _own(self) -> Any:
        """This thread's copy of the template (made on its first use)."""
        tokenizer = getattr(self._local, "tokenizer", None)
        if tokenizer is None:
            with self._lock:
                tokenizer = copy.deepcopy(self._template)
            self._local.tokenizer = tokenizer
        return tokenizer

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._own()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name in _OWN_ATTRIBUTES:
            raise AttributeError(name)
        return getattr(self._own(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a SharedTokenizer is shared between threads: setting {name!r} on it would change "
                             "other calls' answers (use with_truncation_side, or load a tokenizer of your own)")

    def __len__(self) -> int:
        return len(self._own())

    def __reduce__(self) -> tuple:
        return SharedTokenizer, (self._template,)

    def __repr__(self) -> str:
        return f"SharedTokenizer({self._template!r})"

    def with_truncation_side(self, side: str) -> "SharedTokenizer":
        """The same tokenizer truncating on ``side`` (``"right"`` or ``"left"``): itself when it
        already does, else a variant made once from the template and kept."""
        if side == self._template.truncation_side:
            return self
        with self._lock:
            variant = self._variants.get(side)
            if variant is None:
                template = copy.deepcopy(self._template)
                template.truncation_side = side
                variant = self._variants[side] = SharedTokenizer(template)
        return variant
