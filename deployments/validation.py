"""Checking what a request (or a bulk row) asks for, before anything is tokenized: each problem is a
``BadRequestError`` (400) or ``PayloadTooLargeError`` (413) whose message names the field."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError

from deployments.errors import BadRequestError, PayloadTooLargeError
from deployments.settings import LimitsSettings, ModelConfig
from embedder.chunking import check_chunking
from embedder.quantization import RANGED_PRECISIONS, cut_ranges, quantize
from embedder.sentence_pooling import check_pooling_modes

Request = TypeVar("Request", bound=BaseModel)


def problems_message(problems: Sequence[dict]) -> str:
    """Pydantic's validation problems as one line naming each field (the first five)."""
    parts = []
    for problem in problems[:5]:
        location = ".".join(str(x) for x in problem.get("loc", ()) if x != "body")
        parts.append(f"{location or 'body'}: {problem.get('msg', 'invalid')}")
    return "; ".join(parts)


def parse_request(schema: type[Request], /, **fields: Any) -> Request:
    """A handle call's arguments checked by the HTTP route's own request model, so that both doors
    accept and refuse the same things (``BadRequestError`` naming the field)."""
    try:
        return schema.model_validate(fields)
    except ValidationError as error:
        raise BadRequestError(problems_message(error.errors())) from None


def text_problem(value: Any) -> str | None:
    """Why a value cannot be embedded (``"is empty or whitespace only"``, ...), or ``None`` when it can:
    the one rule for request inputs and bulk rows."""
    if value is None:
        return "is null"
    if not isinstance(value, str):
        return f"is {type(value).__name__}, expected a string"
    if not value.strip():
        return "is empty or whitespace only"
    return None


def check_texts(value: Any, limits: LimitsSettings, name: str = "input") -> list[str]:
    """A string or a non-empty list of non-empty strings, within the limits."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise BadRequestError(f"'{name}' must be a string or a list of strings, not {type(value).__name__}")
    if not value:
        raise BadRequestError(f"'{name}' is an empty list")
    check_count(len(value), limits)
    for index, text in enumerate(value):
        if (problem := text_problem(text)) is not None:
            raise BadRequestError(f"{name}[{index}] {problem}")
        if len(text) > limits.max_chars_per_input:
            raise PayloadTooLargeError(f"{name}[{index}] has {len(text)} characters, over the limit "
                                       f"max_chars_per_input={limits.max_chars_per_input}")
    return list(value)


def check_count(count: int, limits: LimitsSettings) -> None:
    if count > limits.max_inputs_per_request:
        raise PayloadTooLargeError(f"{count} inputs in one request, over the limit "
                                   f"max_inputs_per_request={limits.max_inputs_per_request}")


def check_wordpieces(total: int, limit: int) -> None:
    """413 when a request's ``total`` wordpieces are over ``max_wordpieces_per_request`` (``limit``)."""
    if total > limit:
        raise PayloadTooLargeError(f"the request has {total} wordpieces, over the limit "
                                   f"max_wordpieces_per_request={limit}; split it into smaller requests")


def check_words(value: Any, limits: LimitsSettings) -> list[list[str]]:
    """A non-empty list of non-empty lists of strings, within the limits."""
    if not isinstance(value, (list, tuple)) or not value:
        raise BadRequestError("'words' must be a non-empty list of lists of strings")
    check_count(len(value), limits)
    total = sum(len(words) for words in value if isinstance(words, (list, tuple)))
    if total > limits.max_words_per_request:
        raise PayloadTooLargeError(f"the request has {total} words, over the limit "
                                   f"max_words_per_request={limits.max_words_per_request}")
    for index, words in enumerate(value):
        if not isinstance(words, (list, tuple)) or not words:
            raise BadRequestError(f"words[{index}] must be a non-empty list of strings")
        if not all(isinstance(w, str) for w in words):
            raise BadRequestError(f"words[{index}] holds something that is not a string")
        if (chars := sum(len(w) for w in words)) > limits.max_chars_per_input:
            raise PayloadTooLargeError(f"words[{index}] has {chars} characters, over the limit "
                                       f"max_chars_per_input={limits.max_chars_per_input}")
    return [list(words) for words in value]


def check_token_ids(value: Any, limits: LimitsSettings) -> list[list[int]]:
    """Token ids (OpenAI's ``input`` as ``list[int]`` or ``list[list[int]]``): non-empty lists of
    integers, within the limits (an id counts as a wordpiece); the range is the indexer's check."""
    lists = [value] if value and all(isinstance(i, int) for i in value) else value
    if not lists or not all(isinstance(ids, (list, tuple)) and ids for ids in lists):
        raise BadRequestError("token ids must be a non-empty list of integers, or a list of such lists")
    check_count(len(lists), limits)
    for index, ids in enumerate(lists):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise BadRequestError(f"input[{index}] holds something that is not a token id (an integer)")
    total = sum(map(len, lists))
    if total > limits.max_wordpieces_per_request:
        raise PayloadTooLargeError(f"the request has {total} token ids, over the limit "
                                   f"max_wordpieces_per_request={limits.max_wordpieces_per_request}")
    return [list(ids) for ids in lists]


def check_pairs(value: Any, limits: LimitsSettings) -> list[tuple[str, str]]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        raise BadRequestError("'pairs' must be a list of [text, text] pairs")
    firsts = check_texts([p[0] for p in value], limits, "pairs")
    seconds = check_texts([p[1] for p in value], limits, "pairs")
    return list(zip(firsts, seconds))


def check_pooling(value: Any) -> tuple[str, ...] | None:
    """A pooling mode or a list of them, as a tuple (``None``: the model's)."""
    if value is None:
        return None
    if not isinstance(value, (str, list, tuple)):
        raise BadRequestError(f"pooling must be a mode or a list of modes, not {type(value).__name__}")
    try:
        return check_pooling_modes(value)
    except ValueError as error:
        raise BadRequestError(str(error)) from None


def check_chunk_options(chunk_size: Any, chunk_overlap: Any, spans: Any, count: int,
                        limits: LimitsSettings) -> list | None:
    """The chunking a request asks for: the caller's spans (checked here for their shape and number,
    against the text when it is tokenized), else a valid size and overlap."""
    if spans is None:
        try:
            check_chunking(chunk_size, chunk_overlap)
        except ValueError as error:
            raise BadRequestError(str(error)) from None
        return None
    if not isinstance(spans, (list, tuple)) or len(spans) != count:
        raise BadRequestError(f"'spans' must hold one list of [start, end) spans per document ({count})")
    total = sum(len(document) for document in spans if isinstance(document, (list, tuple)))
    if total > limits.max_chunks_per_request:
        raise PayloadTooLargeError(f"the request has {total} spans, over the limit "
                                   f"max_chunks_per_request={limits.max_chunks_per_request}")
    checked = []
    for index, document in enumerate(spans):
        if not isinstance(document, (list, tuple)) or not document:
            raise BadRequestError(f"spans[{index}] must be a non-empty list of [start, end) spans")
        for number, span in enumerate(document):
            if not (isinstance(span, (list, tuple)) and len(span) == 2
                    and all(isinstance(x, int) and not isinstance(x, bool) for x in span)):
                raise BadRequestError(f"spans[{index}][{number}] must be a pair of integers [start, end), "
                                      f"not {span!r}")
        checked.append([tuple(span) for span in document])
    return checked


def truncate_dimensions(vectors: np.ndarray, dimensions: int | None, renormalize: bool) -> np.ndarray:
    """The first ``dimensions`` of each vector (Matryoshka), re-normalized if the model normalizes."""
    if dimensions is None:
        return vectors
    if dimensions > vectors.shape[1]:
        raise BadRequestError(f"dimensions={dimensions} is more than the model's {vectors.shape[1]}")
    vectors = vectors[:, :dimensions]
    if renormalize:
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(vectors, dtype=np.float32)


def quantization_ranges(config: ModelConfig, precision: str, pooling: tuple[str, ...] | None,
                        normalize: bool | None, dimensions: int | None) -> np.ndarray | None:
    """The ranges a request's ``precision`` quantizes in (``None`` for float32, binary and ubinary,
    which need none): the model's own (its resolved config's), cut to the first ``dimensions``.
    ``BadRequestError`` for int8/uint8 on a model without ranges (saying how to give it some), or with
    a pooling or normalization other than the model's, which its ranges were not made for."""
    if precision not in RANGED_PRECISIONS:
        return None
    ranges = config.ranges
    if ranges is None:
        raise BadRequestError(
            f"precision {precision!r} needs per-dimension ranges, and model {config.name!r} has none: set "
            f"quantization_ranges (a .npy file of shape [2, dim]: the min row, the max row) or calibration_corpus "
            f"(a text file, one text per line, embedded at start-up) in its ModelConfig; 'binary' and 'ubinary' "
            f"need no ranges")
    model_modes = config.pooling if isinstance(config.pooling, list) else [config.pooling]
    if pooling is not None and list(pooling) != model_modes:
        raise BadRequestError(f"precision {precision!r}: the ranges of model {config.name!r} were made for its "
                              f"{'+'.join(model_modes)} pooling, not {'+'.join(pooling)}; leave pooling unset")
    if normalize is not None and normalize != config.normalize:
        raise BadRequestError(f"precision {precision!r}: the ranges of model {config.name!r} were made for "
                              f"{'normalized' if config.normalize else 'unnormalized'} vectors; leave normalize "
                              "unset")
    if dimensions is not None and dimensions > ranges.dim:
        raise BadRequestError(f"dimensions={dimensions} is more than the {ranges.dim} its quantization ranges cover")
    return cut_ranges(ranges.array, dimensions)


def quantized(vectors: np.ndarray, precision: str, ranges: np.ndarray | None) -> np.ndarray:
    """``vectors`` in ``precision`` (``quantization_ranges`` gave ``ranges``), each on its own."""
    if precision == "float32":
        return vectors
    try:
        return quantize(vectors, precision, ranges)
    except ValueError as error:
        raise BadRequestError(f"precision {precision!r}: {error}") from None
