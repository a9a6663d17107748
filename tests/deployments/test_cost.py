"""The one cost model, without Ray: what a request will cause is counted before any work, and a
request past a limit is refused naming the limit and the number asked."""

from __future__ import annotations

import pytest

from deployments.cost import (
    RequestCost,
    check_cost,
    fold_cost,
    precision_width,
    text_cost,
    wordpiece_answer_rows,
)
from deployments.errors import PayloadTooLargeError
from deployments.pipeline import echoed_chunk_chars
from deployments.protocol import ChunkRequest, FoldRequest, ScoreRequest, SparseRequest
from deployments.settings import LimitsSettings, ModelConfig
from deployments.tokenizer import RequestFolder

LIMITS = LimitsSettings(max_inputs_per_request=300, max_chars_per_input=1000, max_chars_per_request=20_000,
                        max_answer_bytes=1024 * 1024, max_words_per_request=500, max_chunks_per_request=50)


def refused(cost: RequestCost, limit: str) -> str:
    with pytest.raises(PayloadTooLargeError) as caught:
        check_cost(cost, LIMITS)
    assert limit in caught.value.message
    return caught.value.message


def test_a_prompt_counts_once_per_input_it_is_joined_to():
    fold = FoldRequest(model="m", texts=["a"] * 200, prompt="p" * 500)
    assert fold.num_chars == 200 * 501 and fold.tokenizing_cost == fold.num_chars
    message = refused(fold_cost(fold, vectors=200), "max_chars_per_request")
    assert "100200" in message
    # one input with its prompt over the per-input limit, though each alone is under it
    refused(fold_cost(FoldRequest(model="m", texts=["a" * 600], prompt="p" * 600), vectors=1), "max_chars_per_input")


def test_scoring_and_sparse_requests_count_their_prompt_per_input():
    pairs = [("query", "document")] * 10
    assert ScoreRequest(model="m", pairs=pairs, prompt="x" * 100).num_chars == 10 * (5 + 8 + 100)
    assert SparseRequest(model="m", texts=["ab"] * 3, prompt="x" * 7).num_chars == 3 * 9


def test_a_rerank_query_counts_once_per_document():
    cost = text_cost([10] * 100, joined=300, vectors=100)
    assert cost.chars == 100 * 310 and cost.longest_input_chars == 310
    refused(cost, "max_chars_per_request")
    refused(text_cost([10], joined=1200, vectors=1), "max_chars_per_input")


def test_the_answer_is_bounded_before_any_work():
    # 64 inputs answered 3000 modes wide: far past the answer budget
    refused(text_cost([1] * 64, vectors=64, width=384 * 3000), "max_answer_bytes")
    check_cost(text_cost([1] * 64, vectors=64, width=384), LIMITS)
    # chunk texts echoed: one document, 40 spans over all of it
    chunking = ChunkRequest(spans=[[(0, 1000)] * 40])
    echoed = echoed_chunk_chars(["x" * 1000], chunking, LIMITS)
    assert echoed == 40_000
    refused(fold_cost(FoldRequest(model="m", texts=["x" * 1000], chunks=chunking), vectors=40, width=4,
                      echoed_chars=echoed * 10), "max_answer_bytes")
    # overlapping chunks of a size: each character once per chunk it may be in
    assert echoed_chunk_chars(["x" * 100], ChunkRequest(chunk_size=8, chunk_overlap=6), LIMITS) == 400


def test_quantized_answers_cost_less():
    assert precision_width(384, "float32") == (384, 24)
    assert precision_width(384, "int8") == (384, 5)
    assert precision_width(385, "binary") == (49, 5)


def test_each_limit_is_named_with_the_number_asked():
    assert "301" in refused(text_cost([1] * 301), "max_inputs_per_request")
    refused(RequestCost(inputs=1, chars=1, longest_input_chars=1, words=501), "max_words_per_request")
    refused(RequestCost(inputs=1, chars=1, longest_input_chars=1, chunks=51), "max_chunks_per_request")


def test_wordpiece_level_answers_stop_at_the_answer_budget_once_tokenized(minilm_path):
    limits = LimitsSettings(max_answer_bytes=200_000)
    rows = wordpiece_answer_rows(384, limits)
    assert rows == 200_000 // (384 * 24 + 96)
    folder = RequestFolder([ModelConfig(name="m", model_name=minilm_path)], limits)
    small = folder.fold(FoldRequest(model="m", texts=["a few words"], max_answer_rows=rows))
    assert int(small.num_wordpieces.sum()) <= rows
    with pytest.raises(PayloadTooLargeError, match="max_answer_bytes"):
        folder.fold(FoldRequest(model="m", texts=["many words here " * 10], max_answer_rows=rows))
