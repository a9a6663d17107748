"""Messages between the deployments (ingress -> tokenizer -> encoder -> ingress)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from embedder.chunking import DEFAULT_CHUNK_SIZE
from embedder.indexer import TruncationDirection
from embedder.inference import Level
from embedder.word_pooling import SubTokenMode


@dataclass(frozen=True)
class ChunkRequest:
    """Late chunking: windows of whole words of at most ``chunk_size`` wordpieces, or the caller's
    character ``spans`` per document."""

    chunk_size: int = DEFAULT_CHUNK_SIZE
    chunk_overlap: int = 0
    spans: list[list[tuple[int, int]]] | None = None


@dataclass(frozen=True)
class FoldRequest:
    """What the tokenizer folds: exactly one of texts, pairs, words or token ids, for a served model,
    with the prompt text already chosen (``None``: no prompt)."""

    model: str
    texts: list[str] | None = None
    pairs: list[tuple[str, str]] | None = None
    words: list[list[str]] | None = None
    token_ids: list[list[int]] | None = None
    truncate: bool = False
    truncation_direction: TruncationDirection | None = None
    prompt: str | None = None
    return_wordpieces: bool = False
    chunks: ChunkRequest | None = None

    #: a wordpiece-level answer's most rows (``deployments.cost.wordpiece_answer_rows``), checked once tokenized
    max_answer_rows: int | None = None

    @property
    def input_lengths(self) -> list[int]:
        """Each input's characters, without the prompt (a token id counts as one, a word one more than
        its characters: an empty word is a row of the answer)."""
        if self.texts is not None:
            return list(map(len, self.texts))
        if self.pairs is not None:
            return [len(a) + len(b) for a, b in self.pairs]
        if self.token_ids is not None:
            return list(map(len, self.token_ids))
        return [sum(len(w) + 1 for w in words) for words in self.words or ()]

    @property
    def num_chars(self) -> int:
        """Characters to tokenize: every input's, and the prompt's once per input it is joined to."""
        lengths = self.input_lengths
        return sum(lengths) + len(self.prompt or "") * len(lengths)

    @property
    def tokenizing_cost(self) -> int:
        """What folding this request costs, in characters (``num_chars``): each span costs one more,
        so that a list of spans is not taken for a small request (the ingress tokenizes only small
        requests itself, on its event loop)."""
        spans = sum(map(len, self.chunks.spans)) if self.chunks is not None and self.chunks.spans else 0
        return self.num_chars + spans


@dataclass(frozen=True)
class EncodeOptions:
    """How the encoder turns a folded batch into vectors; ``None`` means the model's default."""

    level: Level = "pooled"
    pooling: tuple[str, ...] | None = None
    normalize: bool | None = None
    sub_token_mode: SubTokenMode = "avg"


@dataclass
class EncodeResult:
    """The encoder's answer to one request.

    vectors: ``[n, dim]`` when pooled, else one ``[length, dim]`` array per input.
    num_wordpieces: each input's wordpieces (usage counts).
    wordpieces: each input's wordpiece strings, when asked for.
    chunks: for late chunking, per input ``[num_chunks, 3]``: each chunk's start and end
        characters and its number of wordpieces.
    timings: milliseconds spent tokenizing, waiting for a batch, and in the batch's forward pass
        (``tokenization_ms``, ``queue_ms``, ``inference_ms``).
    """

    vectors: np.ndarray | list[np.ndarray]
    num_wordpieces: np.ndarray
    wordpieces: list[list[str]] | None = None
    chunks: list[np.ndarray] | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ScoreRequest:
    """What a reranker or classifier scores: exactly one of (query, document) pairs or single
    texts, with the prompt text already chosen (``""``: none) and the request's limits.

    truncate: cut long pairs as ``CrossEncoder.predict`` does, instead of reading the document
        in windows (single texts: instead of refusing them).
    aggregate / window_overlap: how a long document's windows make its score, and how many
        wordpieces consecutive windows share (``None``: a quarter of a window).
    windows: read a long pair's document in windows (False: such a pair is refused unless truncated).
    activate: apply the folder's activation (False: the logits). apply_softmax: a softmax over
        several labels after it.
    max_windows / max_tokens: the request limits on segments scored and their tokens.
    """

    model: str
    pairs: list[tuple[str, str]] | None = None
    texts: list[str] | None = None
    truncate: bool = False
    aggregate: str = "max"
    window_overlap: int | None = None
    windows: bool = True
    prompt: str = ""
    activate: bool = True
    apply_softmax: bool = False
    max_windows: int | None = None
    max_tokens: int | None = None

    @property
    def num_chars(self) -> int:
        """Characters to tokenize: what planning the request costs (the prompt once per input)."""
        if self.pairs is not None:
            return sum(len(a) + len(b) + len(self.prompt) for a, b in self.pairs)
        return sum(len(text) + len(self.prompt) for text in self.texts or ())


@dataclass
class ScoreResult:
    """The scorer's answer to one request: each input's ``PairScore`` (score, the character span
    of the document that gave it, its windows), the tokens scored, and the stages' timings."""

    scores: list
    num_tokens: int
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Ranked:
    """One document of a reranking, best first: its position in the request, its score, and the
    character span ``[start, end)`` of it that gave the score (the whole document when it fit)."""

    index: int
    score: float
    start: int
    end: int


@dataclass(frozen=True)
class SparseRequest:
    """What a sparse encoder encodes: texts, with the prompt text already chosen (``""``: none), the
    route of an inference-free model (``task``: ``query``/``document``; ``None``: its default), the
    request's ``max_active_dims`` and its wordpiece limit."""

    model: str
    texts: list[str]
    truncate: bool = False
    truncation_direction: TruncationDirection | None = None
    prompt: str = ""
    task: str | None = None
    max_active_dims: int | None = None
    return_tokens: bool = False
    max_tokens: int | None = None

    @property
    def num_chars(self) -> int:
        """Characters to tokenize (the prompt once per text)."""
        return sum(len(text) + len(self.prompt) for text in self.texts)


@dataclass
class SparseResult:
    """Each input's sparse vector as ``(indices, values)`` (indices ascending, non-zeros only), each
    input's wordpieces, each entry's token when asked for, and the stages' timings."""

    rows: list[tuple[np.ndarray, np.ndarray]]
    num_wordpieces: np.ndarray
    tokens: list[list[str]] | None = None
    timings: dict[str, float] = field(default_factory=dict)
