"""Every request's work is bounded before it is done, pairs truncate longest_first, and a replica's
death is not resent for a request that caused it by its size."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from cluster.config import ModelConfig
from deployments.errors import ReplicaFailedError
from deployments.pipeline import EmbeddingPipeline
from deployments.protocol import FoldRequest
from deployments.settings import LimitsSettings, ServingSettings

DOCUMENT = ("Late chunking pools each chunk from its whole document, so every chunk keeps its context. " * 50)[:4000]
#: about 15,000 wordpieces: within the test cluster's 20,000 per request
LONG_DOCUMENT = " ".join(f"w{i % 97}" for i in range(5000))
SENTENCES = ["the cluster answers this while it refuses the others", "and this one too"]

#: (route, body, words the 413's message must hold): each a small body asking for unbounded work
UNBOUNDED = [
    ("/embed_chunks", {"inputs": [DOCUMENT], "spans": [[[0, 4000]] * 20_000]},
     ["20000 spans", "max_chunks_per_request=4096"]),
    ("/embed_chunks", {"inputs": [DOCUMENT], "spans": [[[0, 4000]] * 4000]},
     ["wordpieces", "max_chunk_wordpieces_per_request=800000"]),
    ("/embed_chunks", {"inputs": [LONG_DOCUMENT], "chunk_size": 128, "chunk_overlap": 127},
     ["more than 4096 chunks", "max_chunks_per_request=4096"]),
    ("/embed_chunks", {"inputs": [LONG_DOCUMENT], "chunk_size": 128, "chunk_overlap": 127, "context": "chunk",
                       "pooling": "mean"},
     ["more than 4096 chunks", "max_chunks_per_request=4096"]),
    ("/embed_tokens", {"words": [[""] * 100_000], "level": "word"}, ["100000 words", "max_words_per_request=50000"]),
    ("/tokenize", {"words": [["a"] * 60_000]}, ["60000 words", "max_words_per_request=50000"]),
    # a prompt is tokenized with every input: it counts once per input
    ("/embed", {"inputs": ["a"] * 100, "prompt": "p" * 45_000}, ["4500100", "max_chars_per_request=4000000"]),
    ("/embed", {"inputs": ["a" * 30_000], "prompt": "p" * 30_000}, ["60000", "max_chars_per_input=50000"]),
    ("/embed_tokens", {"inputs": ["a"] * 100, "prompt": "p" * 45_000}, ["max_chars_per_request=4000000"]),
    ("/v1/embeddings", {"input": ["a"] * 100, "prompt": "p" * 45_000}, ["max_chars_per_request=4000000"]),
    ("/rerank", {"query": "q" * 60_000, "texts": ["a"]}, ["max_chars_per_input=50000"]),
    # chunk texts are echoed back: 4,096 spans over a 40,000-character document would answer 164 M characters
    ("/embed_chunks", {"inputs": ["x" * 40_000], "spans": [[[0, 40_000]] * 4096]},
     ["max_answer_bytes=268435456"]),
]


@pytest.mark.parametrize("route, body, message", UNBOUNDED, ids=[f"{r}-{m[0]}" for r, _, m in UNBOUNDED])
def test_a_small_body_asking_for_unbounded_work_is_refused_at_once(http, route, body, message):
    started = time.monotonic()
    response = http.post(route, json=body)
    elapsed = time.monotonic() - started
    assert response.status_code == 413, response.text[:300]
    assert all(part in response.json()["error"]["message"] for part in message), response.json()
    # counted before the work: well under a second on a loaded 2-core machine (the work itself took minutes)
    assert elapsed < 1.0


def test_the_cluster_answers_others_while_it_refuses_unbounded_requests(http):
    expected = np.array(http.post("/embed", json={"inputs": SENTENCES}).json())
    with ThreadPoolExecutor(max_workers=8) as pool:
        refused = [pool.submit(http.post, route, json=body) for route, body, _ in UNBOUNDED * 2]
        answered = [pool.submit(http.post, "/embed", json={"inputs": SENTENCES}) for _ in range(8)]
        statuses = [future.result().status_code for future in refused]
        answers = [future.result() for future in answered]
    assert statuses == [413] * len(refused)
    for answer in answers:
        assert answer.status_code == 200
        np.testing.assert_allclose(np.array(answer.json()), expected, atol=1e-5)


def test_pooling_modes_repeated_are_refused(http):
    response = http.post("/embed", json={"inputs": ["a"] * 64, "pooling": ["mean"] * 3000})
    assert response.status_code == 400 and "more than once" in response.json()["error"]["message"]


def test_handle_calls_have_the_same_bounds(client):
    from cluster import PayloadTooLargeError

    with pytest.raises(PayloadTooLargeError, match="max_chars_per_request"):
        client.embed(["a"] * 100, prompt="p" * 45_000)
    with pytest.raises(PayloadTooLargeError, match="max_chunks_per_request"):
        client.embed_chunks([DOCUMENT], spans=[[(0, 4000)] * 20_000])
    with pytest.raises(PayloadTooLargeError, match="max_words_per_request"):
        client.embed_tokens(words=[[""] * 100_000], level="word")


@pytest.fixture(scope="module")
def minilm(minilm_path):
    return AutoModel.from_pretrained(minilm_path).eval()


@pytest.mark.parametrize("side", ["right", "left"])
def test_truncated_pairs_keep_both_texts_as_the_plain_model_sees_them(http, minilm, minilm_path, side):
    """``truncate`` on a pair whose first text alone is longer than max_length (256): each text keeps
    its longest_first share, as sentence-transformers' tokenizer call gives it."""
    query = " ".join(f"question{i}" for i in range(300))
    passages = ["a short passage that must survive truncation", " ".join(f"passage{i}" for i in range(200))]
    pairs = [[query, passage] for passage in passages]
    response = http.post("/embed", json={"pairs": pairs, "truncate": True, "truncation_direction": side})
    assert response.status_code == 200, response.text
    tokenizer = AutoTokenizer.from_pretrained(minilm_path, truncation_side=side)
    encoded = tokenizer([query] * 2, passages, truncation="longest_first", max_length=256, padding=True,
                        return_tensors="pt")
    with torch.no_grad():
        hidden = minilm(**encoded)[0]
    mask = encoded["attention_mask"][..., None].float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    np.testing.assert_allclose(np.array(response.json()), expected, atol=2e-5)
    # the short passage is whole inside its truncated pair, with its [SEP] (the old joined cut dropped it)
    passage = tokenizer(passages[0], add_special_tokens=False)["input_ids"]
    assert int((encoded["token_type_ids"][0] == 1).sum()) == len(passage) + 1


class _DyingReplica:
    """A deployment call whose replica dies every time: counts how often it is sent."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1
        raise ReplicaFailedError("a replica failed while answering")


@pytest.mark.parametrize("characters, sent", [(100, 2), (5000, 1)])
def test_a_request_that_may_have_killed_its_replica_is_not_resent(tiny_bert_path, characters, sent):
    settings = ServingSettings(models=[ModelConfig(name="tiny", model_name=tiny_bert_path, max_length=32)],
                               limits=LimitsSettings(max_retried_chars=1000))
    pipeline = EmbeddingPipeline(settings.model_copy(update={"models": [settings.models[0].resolved()]}),
                                 tokenizer=None, encoders={})
    call = _DyingReplica()
    with pytest.raises(ReplicaFailedError):
        asyncio.run(pipeline._retrying(call, FoldRequest(model="tiny", texts=["x" * characters]).tokenizing_cost))
    assert call.calls == sent
