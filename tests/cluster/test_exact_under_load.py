"""Same numbers alone and under load, and the cost model as a property, over real HTTP.

The first test sends long-document requests that mix folding and truncation (texts, pairs cut
``longest_first``, word vectors, tokenization) once alone and then many at once, and compares
each answer with its lone one. The second generates request bodies under ``max_body_bytes`` and
checks that each is refused at once with a 4xx naming the problem, or answered within the
answer budget the cost model promises.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.config import LimitsSettings, ModelConfig

logger = logging.getLogger(__name__)

LONG = " ".join(f"Sentence {n} is about the {w} near the river {n * 3}." for n, w in
                enumerate(["harbour", "market", "station", "library", "garden", "bridge"] * 25))
QUERY = "which sentence is about the library near the river?"
ROUNDS = 6

#: (route, body): long inputs folded and truncated, pairs cut longest_first, word vectors, tokens
MIXED = [
    ("/embed", {"inputs": [LONG, "short"], "truncate": False}),
    ("/embed", {"inputs": [LONG], "truncate": True}),
    ("/embed", {"inputs": [LONG], "truncate": True, "truncation_direction": "left"}),
    ("/embed", {"pairs": [[QUERY, LONG]], "truncate": True}),
    ("/embed", {"pairs": [[QUERY, LONG]], "truncate": False}),
    ("/embed_tokens", {"inputs": [LONG[:3000]], "truncate": False}),
    ("/tokenize", {"inputs": [LONG], "truncate": True}),
    ("/rerank", {"query": QUERY, "texts": [LONG, "a river"], "truncate": True}),
]


def same_answer(route: str, alone, other) -> None:
    if route == "/tokenize":
        assert other == alone
    elif route == "/embed_tokens":
        assert [entry["tokens"] for entry in other] == [entry["tokens"] for entry in alone]
        for mine, theirs in zip(alone, other):
            np.testing.assert_allclose(theirs["embeddings"], mine["embeddings"], atol=1e-5)
    elif route == "/rerank":
        assert [r["index"] for r in other] == [r["index"] for r in alone]
        np.testing.assert_allclose([r["score"] for r in other], [r["score"] for r in alone], atol=1e-5)
    else:
        np.testing.assert_allclose(np.array(other), np.array(alone), atol=1e-5)


def test_long_documents_answer_alike_alone_and_among_many(http):
    alone = []
    for route, body in MIXED:
        response = http.post(route, json=body)
        assert response.status_code == 200, response.text[:300]
        alone.append(response.json())
    # the lone answers differ where they should: folding keeps every wordpiece, truncation cuts
    tokens = http.post("/tokenize", json={"inputs": [LONG]}).json()[0]
    assert len(tokens["ids"]) > 1000 and tokens["num_segments"] > 1
    assert len(alone[6][0]["ids"]) <= 256
    assert not np.allclose(alone[0][0], alone[1][0], atol=1e-3)
    order = [index for _ in range(ROUNDS) for index in range(len(MIXED))]
    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(lambda index: (index, http.post(MIXED[index][0], json=MIXED[index][1])), order))
    for index, response in answers:
        assert response.status_code == 200, response.text[:300]
        same_answer(MIXED[index][0], alone[index], response.json())


# --- the cost model as a property ---------------------------------------------------------------

PROPERTY_LIMITS = LimitsSettings(max_body_bytes=64 * 1024, max_inputs_per_request=64, max_chars_per_input=4000,
                                 max_chars_per_request=40_000, max_answer_bytes=512 * 1024,
                                 max_wordpieces_per_request=4000, max_chunks_per_request=256, max_words_per_request=2000)
#: a generous bound on any one request's time: a refusal is at once, an answer is a few forward passes
REQUEST_SECONDS = 20.0
#: the most answer bytes one body byte may cause: a one-letter input ("a", 4 bytes) answers a 32-wide vector
#: (about 900 bytes) per pooling mode, a span ([0, 3000], 12 bytes) echoes 3,000 characters
ANSWER_PER_BODY_BYTE = 2000

words = st.text(alphabet="abc xyz", min_size=1, max_size=12).filter(str.strip)
#: sizes drawn across each limit (a text of up to 3,500 characters, up to 48 of them, a prompt of up to
#: 3,500 joined to each), so that bodies within max_body_bytes land on both sides of the limits
texts = st.lists(st.integers(1, 700).map(lambda n: "lorem ipsum " * (n // 2) + "sit"), min_size=1, max_size=48)
prompts = st.one_of(st.none(), st.integers(1, 700).map(lambda n: "query " * n))
poolings = st.one_of(st.none(), st.lists(st.sampled_from(["mean", "cls", "max", "lasttoken"]), min_size=1,
                                         max_size=6))
spans = st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 3000)).map(sorted).filter(lambda s: s[0] < s[1]),
                 min_size=1, max_size=300)
bodies = st.one_of(
    st.builds(lambda inputs, prompt, pooling, truncate: ("/embed", {"inputs": inputs, "prompt": prompt,
                                                                    "pooling": pooling, "truncate": truncate}),
              texts, prompts, poolings, st.booleans()),
    st.builds(lambda inputs, prompt: ("/embed_tokens", {"inputs": inputs, "prompt": prompt}), texts, prompts),
    st.builds(lambda ws: ("/embed_tokens", {"words": ws, "level": "word"}),
              st.lists(st.lists(words, min_size=1, max_size=100), min_size=1, max_size=40)),
    st.builds(lambda document, document_spans: ("/embed_chunks", {"inputs": [document],
                                                                  "spans": [[list(s) for s in document_spans]]}),
              st.just("chunk me " * 333 + "end"), spans),
    st.builds(lambda inputs, size, overlap: ("/embed_chunks", {"inputs": inputs, "chunk_size": size,
                                                               "chunk_overlap": min(overlap, size - 1)}),
              texts, st.integers(1, 64), st.integers(0, 63)),
    st.builds(lambda query, documents: ("/rerank", {"query": query, "texts": documents, "return_text": True}),
              st.integers(1, 500).map(lambda n: "what where " * n), texts),
    st.builds(lambda inputs, prompt: ("/tokenize", {"inputs": inputs, "prompt": prompt}), texts, prompts),
)


@pytest.fixture(scope="module")
def property_url(module_app, tiny_bert_path):
    models = [ModelConfig(name="tiny", model_name=tiny_bert_path, max_length=32, dtype="float32", num_cpus=0.1)]
    with module_app("cost-property", "/cost-property", models, limits=PROPERTY_LIMITS) as url:
        yield url


def test_every_body_is_refused_at_once_or_answered_within_its_budget(property_url):
    seen: dict[int, int] = {}
    with httpx.Client(base_url=property_url, timeout=60) as client:

        @given(case=bodies)
        @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            route, body = case
            body = {key: value for key, value in body.items() if value is not None}
            content = httpx.Request("POST", "/", json=body).content
            if len(content) > PROPERTY_LIMITS.max_body_bytes:
                return
            started = time.monotonic()
            response = client.post(route, content=content, headers={"content-type": "application/json"})
            elapsed = time.monotonic() - started
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, response.text[:300]
            assert elapsed < REQUEST_SECONDS
            if response.status_code >= 400:
                assert response.json()["error"]["message"]
            else:
                assert len(response.content) <= PROPERTY_LIMITS.max_answer_bytes, (route, len(response.content))
                assert len(response.content) <= ANSWER_PER_BODY_BYTE * len(content), (route, len(content))

        check()
    logger.warning("cost property: answers by status %s", seen)
    # both outcomes were met: some bodies were refused, others answered
    assert seen.get(200, 0) >= 5 and sum(count for status, count in seen.items() if status >= 400) >= 5, seen
