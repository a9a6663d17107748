"""One cost model: what a request will cause, counted from the validated request before any work.

Every front door (HTTP, gRPC, the handle, bulk rows) validates its request, turns it into one
``RequestCost`` here and checks it with ``check_cost`` against ``LimitsSettings``, before anything
is tokenized or encoded. A request past a limit gets a 413 naming the limit and the number asked.

What is counted, and how:

- ``inputs``: texts, pairs, word lists, token-id lists, documents.
- ``chars``: the characters to tokenize. A prompt, or a rerank query, is tokenized with every input
  it is joined to, so it counts once per input; ``longest_input_chars`` is one input's characters
  with its prompt or query.
- ``words`` and ``chunks``: pre-split words and caller spans (each is a row of the answer).
- ``vectors`` and ``answer_bytes``: the rows of the answer and an upper bound of its size as JSON
  (``VALUE_BYTES`` per number, ``CHAR_BYTES`` per character echoed back, ``ROW_BYTES`` per row).

What a request causes that only tokenizing can tell (its wordpieces, the windows of a long
document, a wordpiece-level answer's rows) is counted where the wordpieces are made, before any
encoding: ``wordpiece_answer_rows`` turns the answer budget into the most rows a request may ask.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict

from deployments.errors import PayloadTooLargeError
from deployments.protocol import FoldRequest
from deployments.settings import LimitsSettings

#: Bytes of one number of an answer, at most: a float32 as JSON (``-1.2345678918254375e-05,``).
VALUE_BYTES = 24
#: Bytes of one number of a quantized answer (``-128,``) and of a base64 float32 (4 bytes, 4/3 in base64).
QUANTIZED_VALUE_BYTES = 5
BASE64_VALUE_BYTES = 6
#: Bytes of one character echoed back, at most (JSON escapes a control character as ``\u00XX``).
CHAR_BYTES = 6
#: Bytes of a row's frame (its index, brackets, keys).
ROW_BYTES = 96


class RequestCost(BaseModel):
    """What a request will cause (see the module's docstring for how each is counted)."""

    model_config = ConfigDict(frozen=True)

    inputs: int
    chars: int
    longest_input_chars: int
    words: int = 0
    chunks: int = 0
    vectors: int = 0
    answer_bytes: int = 0


def text_cost(lengths: Sequence[int], *, joined: int = 0, words: int = 0, chunks: int = 0, vectors: int = 0,
              width: int = 0, value_bytes: int = VALUE_BYTES, echoed_chars: int = 0) -> RequestCost:
    """The cost of inputs of ``lengths`` characters each, each joined to ``joined`` more characters (a
    prompt, a query), answered by ``vectors`` rows of ``width`` numbers and ``echoed_chars`` characters."""
    return RequestCost(
        inputs=len(lengths),
        chars=sum(lengths) + joined * len(lengths),
        longest_input_chars=max(lengths, default=0) + joined,
        words=words,
        chunks=chunks,
        vectors=vectors,
        answer_bytes=vectors * (width * value_bytes + ROW_BYTES) + echoed_chars * CHAR_BYTES,
    )


def fold_cost(fold: FoldRequest, *, vectors: int, width: int = 0, value_bytes: int = VALUE_BYTES,
              echoed_chars: int = 0) -> RequestCost:
    """The cost of a request to fold (``text_cost`` of its inputs, its prompt joined to each)."""
    words = sum(map(len, fold.words)) if fold.words is not None else 0
    spans = sum(map(len, fold.chunks.spans)) if fold.chunks is not None and fold.chunks.spans else 0
    return text_cost(fold.input_lengths, joined=len(fold.prompt or ""), words=words, chunks=spans, vectors=vectors,
                     width=width, value_bytes=value_bytes, echoed_chars=echoed_chars)


def precision_width(width: int, precision: str) -> tuple[int, int]:
    """The numbers a vector of ``width`` dimensions takes in ``precision``, and the bytes of each."""
    if precision in ("binary", "ubinary"):
        return -(-width // 8), QUANTIZED_VALUE_BYTES
    return width, VALUE_BYTES if precision == "float32" else QUANTIZED_VALUE_BYTES


def _too_large(what: str, limit_name: str, limit: int, advice: str = "") -> PayloadTooLargeError:
    """413: ``what`` (the number asked, in words), the limit's name and value, and ``advice``."""
    return PayloadTooLargeError(f"{what}, over the limit {limit_name}={limit}" + (f"; {advice}" if advice else ""))


def check_cost(cost: RequestCost, limits: LimitsSettings) -> RequestCost:
    """``cost`` when it is within every limit, else a 413 (``PayloadTooLargeError``) naming the first
    limit it passes and the number asked."""
    if cost.inputs > limits.max_inputs_per_request:
        raise _too_large(f"{cost.inputs} inputs in one request", "max_inputs_per_request",
                         limits.max_inputs_per_request)
    if cost.longest_input_chars > limits.max_chars_per_input:
        raise _too_large(f"an input has {cost.longest_input_chars} characters with the prompt or query joined to it",
                         "max_chars_per_input", limits.max_chars_per_input)
    if cost.chars > limits.max_chars_per_request:
        raise _too_large(f"the request has {cost.chars} characters to tokenize (a prompt or query counted once per "
                         "input it is joined to)", "max_chars_per_request", limits.max_chars_per_request,
                         "split it into smaller requests")
    if cost.words > limits.max_words_per_request:
        raise _too_large(f"the request has {cost.words} words", "max_words_per_request", limits.max_words_per_request)
    if cost.chunks > limits.max_chunks_per_request:
        raise _too_large(f"the request has {cost.chunks} spans", "max_chunks_per_request",
                         limits.max_chunks_per_request)
    if cost.answer_bytes > limits.max_answer_bytes:
        raise _too_large(f"the answer could take {cost.answer_bytes} bytes", "max_answer_bytes",
                         limits.max_answer_bytes, "ask for fewer inputs, dimensions, pooling modes or spans")
    return cost


def check_sparse_answer(nonzeros: int, rows: int, tokens: bool, limits: LimitsSettings) -> None:
    """413 when sparse vectors' answer (an index and a value per non-zero, and its token when asked)
    would pass ``max_answer_bytes``. A sparse vector's non-zeros are known only once it is encoded (a
    request's ``max_active_dims`` bounds them before: ``text_cost``'s ``width``), so this check comes
    after the encoder and before the answer is written."""
    entry = 2 * VALUE_BYTES + (ROW_BYTES if tokens else 0)
    size = nonzeros * entry + rows * ROW_BYTES
    if size > limits.max_answer_bytes:
        raise _too_large(f"the sparse vectors' answer would take {size} bytes", "max_answer_bytes",
                         limits.max_answer_bytes, "send fewer texts per request, or set max_active_dims")


def wordpiece_answer_rows(width: int, limits: LimitsSettings, value_bytes: int = VALUE_BYTES) -> int:
    """The most rows of ``width`` numbers an answer may have within ``max_answer_bytes`` (a
    wordpiece-level answer: its rows are known once the request is tokenized)."""
    return limits.max_answer_bytes // (width * value_bytes + ROW_BYTES)


def check_answer_rows(rows: int, most: int | None, limits: LimitsSettings) -> None:
    """413 when a tokenized request's answer has more rows than ``most`` (``wordpiece_answer_rows``)."""
    if most is not None and rows > most:
        raise _too_large(f"the answer has {rows} rows (one vector per wordpiece)", "max_answer_bytes",
                         limits.max_answer_bytes, f"at most {most} rows of this model fit; send fewer or shorter "
                                                  "inputs, or ask for level 'word'")
