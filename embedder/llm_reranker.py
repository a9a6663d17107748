"""LLM rerankers (Qwen3-Reranker style): a ``*ForCausalLM`` folder scored as sentence-transformers 6 scores it.

sentence-transformers 6 loads such a folder as a ``Transformer`` with ``transformer_task``
``text-generation`` and a ``LogitScore`` module: the pair's score is the logit of the "yes" token
minus the "no" token (``true_token_id`` / ``false_token_id``, or the true token's logit alone) at
the last position, the inputs left-padded so that the last position is a real token, and the lm
head run on that position only (``logits_to_keep=1``). A folder saved by sentence-transformers
names the module and its token ids (``1_LogitScore/config.json``); a plain ``transformers`` folder
gets "yes" and "no".

When the tokenizer has a chat template (the modality ``message``), a pair is rendered through it as
sentence-transformers renders it: one message with the role ``query``, one with the role
``document``, and the prompt (the instruction) as a ``system`` message before them.
``ChatTemplatePairs`` reproduces this render without running Jinja per pair: the template, rendered
once per prompt with sentinels, must place the query and the document verbatim (checked on probes
at load), so a pair's text is the template's literal parts around them. A render cut by truncation
gets the template's tail written back over its last tokens, as sentence-transformers does (the tail
is the common token suffix of two renders with different fillers). Without a chat template the pair
goes through the tokenizer's pair template, as for any cross-encoder.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from embedder.pair_windows import window_budget
from embedder.sentence_folder import UnsupportedModelError, read_json
from embedder.shared_tokenizer import PROMPT_CACHE_SIZE

#: The Transformer task of an LLM reranker, and the output its LogitScore module reads.
LLM_TASK = "text-generation"
CAUSAL_LOGITS = "causal_logits"
_CAUSAL_TEXT = {"method": "forward", "method_output_name": "logits"}
#: The tokens sentence-transformers scores a plain ``*ForCausalLM`` folder with.
DEFAULT_TRUE_TOKEN, DEFAULT_FALSE_TOKEN = "yes", "no"
#: The roles sentence-transformers gives a pair's two texts, and its probes that both reach the render.
PAIR_ROLES = ("query", "document")
_PAIR_ROLE_PROBES = (("alpha", "bravo"), ("charlie", "bravo"), ("alpha", "foxtrot"))
#: More probes: the template must place the texts verbatim (no trim, no escaping, no case change).
_VERBATIM_PROBES = ((" padded query \n", "\n\tdocument, spaced  "), ("<b>&amp;</b> 'quoted' \"x\"", "{{ x }} {% y %}"),
                    ("Straße ÉTÉ 東京", "multi\nline\n\ndocument"))
_SENTINELS = {"query": "\x00QUERY-SLOT\x00", "document": "\x00DOCUMENT-SLOT\x00"}
#: The model types sentence-transformers knows to take flat messages, whatever their template says.
_FLAT_MODEL_TYPES = frozenset({"apertus", "deepseek_v3", "gpt_oss", "seed_oss"})
_STRUCTURED_PATTERNS = ("content[0]", ".type", "'type'", '"type"', "item.type", "message.content[")
#: The fillers sentence-transformers renders a conversation's skeleton with to find the template's tail.
_SUFFIX_FILLERS = ("0", "1 2 3 4")


def is_logit_score_module(kind: str) -> bool:
    """Whether a ``modules.json`` type names sentence-transformers' ``LogitScore`` module."""
    return kind.startswith("sentence_transformers.") and kind.rsplit(".", 1)[-1] == "LogitScore"


def is_causal_lm(architectures: Sequence[Any]) -> bool:
    """Whether sentence-transformers would load the folder as an LLM reranker (its first architecture)."""
    return bool(architectures) and str(architectures[0]).endswith("ForCausalLM")


@dataclass(frozen=True)
class LogitScoreHead:
    """sentence-transformers' ``LogitScore``: the logit of ``true_token_id`` at the last position,
    minus that of ``false_token_id`` when there is one. One score per pair."""

    true_token_id: int
    false_token_id: int | None = None
    source: str = ""

    num_labels = 1
    auto_class = "AutoModelForCausalLM"
    pads_left = True

    def scores(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[rows, 1]`` scores of a left-padded batch, in the model's dtype (as ``LogitScore`` computes them)."""
        logits = model(**batch, logits_to_keep=1).logits[:, -1]
        scores = logits[:, self.true_token_id]
        if self.false_token_id is not None:
            scores = scores - logits[:, self.false_token_id]
        return scores.unsqueeze(1)


def read_logit_score(model_name: str, entry: dict, number: int) -> LogitScoreHead:
    """The LogitScore module of ``modules.json`` entry ``number``, from its ``config.json``."""
    path = str(entry.get("path", "")).strip("/")
    where = f"{model_name}/{path or '.'} (LogitScore module, modules.json entry {number})"
    config = read_json(model_name, "/".join(p for p in (path, "config.json") if p))
    if not isinstance(config, dict) or not isinstance(config.get("true_token_id"), int):
        raise UnsupportedModelError(f"{where}: no config.json with an integer true_token_id")
    false_token_id = config.get("false_token_id")
    if false_token_id is not None and not isinstance(false_token_id, int):
        raise UnsupportedModelError(f"{where}: false_token_id {false_token_id!r} is not a token id")
    if config.get("module_input_name", CAUSAL_LOGITS) != CAUSAL_LOGITS:
        raise UnsupportedModelError(f"{where}: module_input_name {config['module_input_name']!r} is not supported "
                                    f"(only {CAUSAL_LOGITS!r}, the causal LM's logits)")
    return LogitScoreHead(config["true_token_id"], false_token_id, where)


def default_logit_score(tokenizer: Any, model_name: str) -> LogitScoreHead:
    """What sentence-transformers puts on a plain ``*ForCausalLM`` folder: "yes" minus "no"."""
    true_id = tokenizer.convert_tokens_to_ids(DEFAULT_TRUE_TOKEN)
    false_id = tokenizer.convert_tokens_to_ids(DEFAULT_FALSE_TOKEN)
    if true_id is None or false_id is None:
        raise UnsupportedModelError(f"{model_name}: a *ForCausalLM folder whose tokenizer has no 'yes' and/or 'no' "
                                    "token, which sentence-transformers scores an LLM reranker with; save it with "
                                    "a LogitScore module naming its tokens")
    return LogitScoreHead(int(true_id), int(false_id), f"{model_name} ('yes' minus 'no', the default)")


def check_causal_modality(where: str, modality_config: Any, module_output_name: Any) -> str | None:
    """The message format a saved text-generation Transformer asks for (``None``: no ``message``
    modality, pairs through the tokenizer; ``"auto"``: inferred from the template; ``"infer"``: no
    ``modality_config``, so messages exactly when the tokenizer has a chat template), or
    ``UnsupportedModelError`` for inputs or outputs other than text in and causal logits out."""
    if module_output_name not in (None, CAUSAL_LOGITS):
        raise UnsupportedModelError(f"{where}: module_output_name {module_output_name!r} is not supported for an LLM "
                                    f"reranker (only {CAUSAL_LOGITS!r})")
    if modality_config is None:
        return "infer"
    if not isinstance(modality_config, dict) or modality_config.get("text") != _CAUSAL_TEXT \
            or set(modality_config) - {"text", "message"}:
        raise UnsupportedModelError(f"{where}: modality_config {modality_config!r}: only text (and chat messages) in "
                                    "and the causal LM's logits out are supported")
    if "message" not in modality_config:
        return None
    message = dict(modality_config["message"])
    message_format = message.pop("format", "auto")
    if message != _CAUSAL_TEXT or message_format not in ("auto", "flat", "structured"):
        raise UnsupportedModelError(f"{where}: modality_config message {modality_config['message']!r} is not "
                                    "supported")
    return message_format


def infer_message_format(model_type: str, template: Any) -> str:
    """sentence-transformers' guess of how a chat template takes a message's content: ``flat``
    (a string) or ``structured`` (a list of typed parts)."""
    if model_type in _FLAT_MODEL_TYPES:
        return "flat"
    if not isinstance(template, str) or not template:
        return "structured"
    return "structured" if any(pattern in template for pattern in _STRUCTURED_PATTERNS) else "flat"


@dataclass(frozen=True)
class _Template:
    """A chat template rendered for one prompt: literal text around the two slots, in render order."""

    pieces: tuple[str, str, str]
    order: tuple[str, str]
    suffix: tuple[int, ...]

    def text(self, query: str, document: str) -> tuple[str, int]:
        """The rendered pair and where its document starts in it."""
        first, second = (query, document) if self.order == PAIR_ROLES else (document, query)
        head, middle, tail = self.pieces
        text = head + first + middle + second + tail
        start = len(head) if self.order[0] == "document" else len(head) + len(first) + len(middle)
        return text, start


class ChatTemplatePairs:
    """Pairs rendered through the tokenizer's chat template, as sentence-transformers renders them.

    ``UnsupportedModelError`` at construction when the template loses the query or the document
    (as sentence-transformers refuses it) or does not place them verbatim (which could not be
    reproduced without rendering each pair, and breaks the document's character spans)."""

    def __init__(self, tokenizer: Any, message_format: str, model_name: str, prompts: Sequence[str] = ()) -> None:
        self.tokenizer, self.message_format, self.model_name = tokenizer, message_format, model_name
        #: the template's parts per prompt: a request may bring any prompt, so the cache is bounded
        self._templates = functools.lru_cache(maxsize=PROMPT_CACHE_SIZE)(self._make_template)
        for prompt in ("", *prompts):
            try:
                self.template(prompt)
            except ValueError as error:
                raise UnsupportedModelError(str(error)) from None
        #: The template's own tokens (no prompt, empty texts): what a pair holds besides its texts.
        self.num_special = self._length(self.template(None).text("", "")[0])

    def messages(self, query: str, document: str, prompt: str | None) -> list[dict[str, Any]]:
        """The conversation sentence-transformers renders for a pair."""
        def message(role: str, content: str) -> dict[str, Any]:
            if self.message_format == "flat":
                return {"role": role, "content": content}
            return {"role": role, "content": [{"type": "text", "text": content}]}

        system = [message("system", prompt)] if prompt else []
        return [*system, message("query", query), message("document", document)]

    def render(self, query: str, document: str, prompt: str | None) -> str:
        """The tokenizer's own render of a pair (what the template parts must reproduce)."""
        return str(self.tokenizer.apply_chat_template(self.messages(query, document, prompt), tokenize=False))

    def template(self, prompt: str | None) -> _Template:
        """The template's parts for ``prompt`` (cached); ``ValueError`` when they cannot reproduce its render."""
        return self._templates(prompt or "")

    def _make_template(self, prompt: str) -> _Template:
        where = f"{self.model_name}: the chat template" + (f" with the prompt {prompt!r}" if prompt else "")
        try:
            renders = [self.render(q, d, prompt) for q, d in _PAIR_ROLE_PROBES]
            rendered = self.render(_SENTINELS["query"], _SENTINELS["document"], prompt)
        except Exception as error:  # noqa: BLE001 - a template raising is a refusal, whatever it raises
            raise ValueError(f"{where} cannot render a (query, document) pair: {type(error).__name__}: {error}") \
                from None
        dropped = [role for role, render in zip(PAIR_ROLES, renders[1:]) if render == renders[0]]
        if dropped:
            raise ValueError(f"{where} cannot carry a 'query'/'document' pair (the {' and '.join(dropped)} content "
                             "does not reach the rendered prompt), so sentence-transformers cannot score with it")
        slots = sorted(PAIR_ROLES, key=lambda role: rendered.find(_SENTINELS[role]))
        if any(rendered.count(_SENTINELS[role]) != 1 for role in PAIR_ROLES):
            raise ValueError(f"{where} does not place the query and the document once each")
        head, rest = rendered.split(_SENTINELS[slots[0]])
        middle, tail = rest.split(_SENTINELS[slots[1]])
        parts = _Template((head, middle, tail), (slots[0], slots[1]), ())
        for query, document in (*_PAIR_ROLE_PROBES, *_VERBATIM_PROBES):
            if self.render(query, document, prompt) != parts.text(query, document)[0]:
                raise ValueError(f"{where} changes the query or the document it renders (it must place them "
                                 "verbatim), so its tokens cannot be reproduced")
        return _Template(parts.pieces, parts.order, tuple(self._suffix(prompt)))

    def _suffix(self, prompt: str) -> list[int]:
        """The template's tail that sentence-transformers writes back over a truncated render: the
        common token suffix of the pair's skeleton rendered with two fillers (none when they share all)."""
        first, second = (self._ids(self.render(filler, filler, prompt)) for filler in _SUFFIX_FILLERS)
        count = 0
        for left, right in zip(reversed(first), reversed(second)):
            if left != right:
                break
            count += 1
        return first[len(first) - count:] if 0 < count < min(len(first), len(second)) else []

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def _length(self, text: str) -> int:
        return len(self._ids(text))

    def texts(self, queries: Sequence[str], documents: Sequence[str],
              prompt: str | None) -> tuple[list[str], list[int]]:
        """Each pair's rendered text and where its document starts in it."""
        template = self.template(prompt)
        rendered = [template.text(query, document) for query, document in zip(queries, documents)]
        return [text for text, _ in rendered], [start for _, start in rendered]

    def lengths(self, queries: Sequence[str], documents: Sequence[str], prompt: str | None,
                document_pieces: Sequence[Sequence[int]] = ()) -> list[int]:
        """Each pair's tokens, rendered whole."""
        texts, _ = self.texts(queries, documents, prompt)
        if not texts:
            return []
        encoded = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                                 return_token_type_ids=False, verbose=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def window_budget(self, query: str, prompt: str | None, max_length: int) -> int:
        """Document tokens beside the query, the prompt and the template (the render with an empty document)."""
        room = self._length(self.template(prompt).text(query, "")[0])
        return window_budget(max_length, 0, room, what="the query in its prompt template")

    def window_excess(self, query: str, texts: Sequence[str], prompt: str | None, max_length: int) -> int:
        """The template's tokens can merge with a window's first or last word: the longest window's
        tokens over ``max_length``, measured on its render."""
        return max(self.lengths([query] * len(texts), texts, prompt), default=0) - max_length

    def encode(self, queries: Sequence[str], texts: Sequence[str], truncated: Sequence[bool], prompt: str | None,
               max_length: int, keys: Sequence[str]) -> tuple[dict[str, list[list[int]]], list[tuple[int, int]]]:
        """The pairs tokenized as sentence-transformers tokenizes their render (cut to ``max_length``
        on the tokenizer's truncation side, the template's tail written back over a cut render), and
        the character span of each text that is kept."""
        template = self.template(prompt)
        rendered, starts = self.texts(queries, texts, prompt)
        encoded = self.tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=any(truncated),
                                 verbose=False)
        inputs: dict[str, list[list[int]]] = {key: [] for key in ("input_ids", *keys)
                                              if key != "attention_mask" and key in encoded}
        spans = [(0, len(text)) for text in texts]
        left = self.tokenizer.truncation_side == "left"
        for index, length in enumerate(len(ids) for ids in encoded["input_ids"]):
            kept = slice(length - max_length, length) if left and length > max_length else slice(0, max_length)
            row = {key: list(encoded[key][index][kept]) for key in inputs}
            real = len(row["input_ids"])
            # sentence-transformers writes the template's tail back over every row that reached max_length
            restored = min(len(template.suffix), real) if real >= max_length else 0
            if restored:
                row["input_ids"][real - restored:] = template.suffix[-restored:]
            for key in inputs:
                inputs[key].append(row[key])
            if truncated[index]:
                start, end = starts[index], starts[index] + len(texts[index])
                inside = [(s, e) for s, e in encoded["offset_mapping"][index][kept][:real - restored]
                          if e > start and s < end and e > s]
                spans[index] = (max(start, min(s for s, _ in inside)) - start,
                                min(end, max(e for _, e in inside)) - start) if inside else (0, 0)
        return inputs, spans

    def encode_texts(self, texts: Sequence[str], truncate: bool, max_length: int,
                     keys: Sequence[str]) -> tuple[dict[str, list[list[int]]], list[tuple[int, int]]]:
        """Refused: an LLM reranker scores (query, document) pairs, never single texts (``ValueError``)."""
        raise ValueError("this LLM reranker renders (query, document) pairs through its chat template; it scores "
                         "pairs, not single texts")
