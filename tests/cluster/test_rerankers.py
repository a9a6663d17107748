"""Rerankers and classifiers served by the cluster (HTTP, the ``cohere`` client, the handle),
against sentence-transformers' ``CrossEncoder`` and the plain ``transformers`` classifier."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import httpx
import numpy as np
import pytest
import torch

from cluster.config import LimitsSettings, ModelConfig
from reranker_folders import LLM_RERANKERS, RERANKERS, build_rerankers
from st_folders import TEXTS

APP_NAME = "rerankers-test"
ROUTE_PREFIX = "/rerankers"
SERVED = ("bert-plain", "st6-identity", "xlmr-reranker", "bert-3-labels", "qwen3-llm-reranker")
TOLERANCE = 1e-5
QUERY = "what is the capital of France?"
DOCUMENTS = [TEXTS[0], "Paris is the capital of France.", TEXTS[2], "quick brown fox jumps", TEXTS[4]]
#: Far longer than every served reranker's 48-64 tokens, with sentences that differ (no tied windows).
LONG_DOCUMENT = " ".join(f"Sentence {n} tells of {w} and of the river {n * 7}." for n, w in
                         enumerate(["Paris", "rain", "bread", "cats", "trains", "music", "snow", "maps"] * 3))
LONG_QUERY = " ".join(["Paris is the capital and most populous city of France."] * 4)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, minilm_path) -> dict[str, str]:
    return build_rerankers(tmp_path_factory.mktemp("served-rerankers"), minilm_path, RERANKERS + LLM_RERANKERS[:1])


@pytest.fixture(scope="module")
def rerank_url(module_app, folders) -> str:
    models = [ModelConfig(name=name, model_name=folders[name], dtype="float32", num_cpus=0.05, torch_threads=1)
              for name in SERVED]
    with module_app(APP_NAME, ROUTE_PREFIX, models, limits=LimitsSettings(max_chunks_per_request=40)) as url:
        yield url


@pytest.fixture(scope="module")
def http(rerank_url):
    with httpx.Client(base_url=rerank_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def reference(folders):
    """``CrossEncoder`` of a served folder, loaded once."""
    from sentence_transformers import CrossEncoder

    return cache(lambda name: CrossEncoder(folders[name], device="cpu"))


def ranked_scores(results: list[dict], count: int, key: str = "score") -> np.ndarray:
    """The scores of a ranking, back in the request's order (each index exactly once)."""
    assert sorted(r["index"] for r in results) == list(range(count))
    scores = [r[key] for r in results]
    assert scores == sorted(scores, reverse=True)
    by_index = {r["index"]: r[key] for r in results}
    return np.array([by_index[i] for i in range(count)])


@pytest.mark.parametrize("name", SERVED[:3])
def test_rerank_equals_cross_encoder_predict(http, reference, name):
    answer = http.post("/rerank", json={"model": name, "query": QUERY, "texts": DOCUMENTS, "return_text": True})
    assert answer.status_code == 200, answer.text
    results = answer.json()
    expected = reference(name).predict([(QUERY, document) for document in DOCUMENTS])
    assert np.abs(ranked_scores(results, len(DOCUMENTS)) - expected).max() <= TOLERANCE
    for result in results:
        assert result["text"] == DOCUMENTS[result["index"]]
        assert result["window"] == {"start": 0, "end": len(DOCUMENTS[result["index"]])}
    assert "x-inference-time" in answer.headers


def test_raw_scores_are_the_logits_and_truncate_cuts_as_predict(http, reference):
    name = "bert-plain"
    texts = DOCUMENTS[:2] + [LONG_DOCUMENT]
    raw = http.post("/rerank", json={"model": name, "query": QUERY, "texts": texts, "raw_scores": True,
                                     "truncate": True}).json()
    logits = reference(name).predict([(QUERY, text) for text in texts], activation_fn=torch.nn.Identity())
    assert np.abs(ranked_scores(raw, 3) - logits).max() <= TOLERANCE
    long_result = next(r for r in raw if r["index"] == 2)
    assert 0 < long_result["window"]["end"] < len(LONG_DOCUMENT)


def test_truncated_and_windowed_reranks_answer_alike_alone_and_among_many(http, reference):
    """The twin of the reference tests under load: reranks that truncate (longest_first, as
    CrossEncoder.predict) and reranks that read windows, sent at once, each equal to its lone answer
    and to the reference."""
    name, texts = "bert-plain", [LONG_DOCUMENT, DOCUMENTS[1], LONG_QUERY + " " + LONG_DOCUMENT]
    bodies = [{"model": name, "query": QUERY, "texts": texts, "truncate": truncate}
              for truncate in (True, False)] + [{"model": name, "inputs": [[LONG_QUERY, LONG_DOCUMENT]],
                                                 "truncate": True}]
    routes = ["/rerank", "/rerank", "/predict"]
    alone = [http.post(route, json=body).json() for route, body in zip(routes, bodies)]
    expected = reference(name).predict([(QUERY, text) for text in texts])
    assert np.abs(ranked_scores(alone[0], len(texts)) - expected).max() <= TOLERANCE
    with ThreadPoolExecutor(max_workers=9) as pool:
        answers = list(pool.map(lambda index: (index, http.post(routes[index], json=bodies[index])),
                                [index for _ in range(6) for index in range(len(bodies))]))
    for index, response in answers:
        assert response.status_code == 200, response.text[:300]
        if routes[index] == "/predict":
            np.testing.assert_allclose(response.json()[0][0]["score"], alone[index][0][0]["score"], atol=TOLERANCE)
        else:
            np.testing.assert_allclose(ranked_scores(response.json(), len(texts)),
                                       ranked_scores(alone[index], len(texts)), atol=TOLERANCE)


def test_predict_refuses_a_long_pair_naming_truncate(http):
    response = http.post("/predict", json={"model": "bert-3-labels", "inputs": [[LONG_QUERY, LONG_DOCUMENT * 4]]})
    assert response.status_code == 413, response.text[:300]
    message = response.json()["error"]["message"]
    assert "truncate" in message and "aggregate" not in message


@pytest.mark.parametrize("name", ["bert-plain", "xlmr-reranker"])
def test_a_long_document_scores_its_best_window(http, reference, folders, name):
    from embedder import CrossEncoderScorer

    answer = http.post("/rerank", json={"model": name, "query": QUERY, "texts": [LONG_DOCUMENT, DOCUMENTS[1]]})
    assert answer.status_code == 200, answer.text
    long_result = next(r for r in answer.json() if r["index"] == 0)
    spans = CrossEncoderScorer(folders[name]).plan_windows(QUERY, LONG_DOCUMENT)
    assert len(spans) > 2
    window_scores = reference(name).predict([(QUERY, LONG_DOCUMENT[start:end]) for start, end in spans])
    assert abs(long_result["score"] - window_scores.max()) <= TOLERANCE
    best = spans[int(np.argmax(window_scores))]
    assert (long_result["window"]["start"], long_result["window"]["end"]) == best
    first = http.post("/rerank", json={"model": name, "query": QUERY, "texts": [LONG_DOCUMENT],
                                       "aggregate": "first"}).json()[0]
    assert abs(first["score"] - window_scores[0]) <= TOLERANCE


def test_an_llm_reranker_is_served_as_cross_encoder_scores_it(http, reference, folders):
    """A Qwen3-Reranker style folder (LogitScore, chat template, instruction): short pairs, raw
    scores of truncated pairs, and a long document's best window, against ``CrossEncoder``."""
    from embedder import CrossEncoderScorer

    name = "qwen3-llm-reranker"
    card = next(card for card in http.get("/models").json()["data"] if card["id"] == name)
    assert (card["kind"], card["activation"], card["max_length"]) == ("reranker", "Sigmoid", 192)
    model = reference(name)
    answer = http.post("/rerank", json={"model": name, "query": QUERY, "texts": DOCUMENTS})
    assert answer.status_code == 200, answer.text
    expected = model.predict([(QUERY, document) for document in DOCUMENTS])
    assert np.abs(ranked_scores(answer.json(), len(DOCUMENTS)) - expected).max() <= TOLERANCE
    texts = DOCUMENTS[:2] + [LONG_DOCUMENT]
    raw = http.post("/rerank", json={"model": name, "query": QUERY, "texts": texts, "raw_scores": True,
                                     "truncate": True}).json()
    logits = model.predict([(QUERY, text) for text in texts], activation_fn=torch.nn.Identity())
    assert np.abs(ranked_scores(raw, 3) - logits).max() <= TOLERANCE
    long_result = http.post("/rerank", json={"model": name, "query": QUERY, "texts": [LONG_DOCUMENT]}).json()[0]
    spans = CrossEncoderScorer(folders[name]).plan_windows(QUERY, LONG_DOCUMENT)
    window_scores = model.predict([(QUERY, LONG_DOCUMENT[start:end]) for start, end in spans])
    assert len(spans) >= 2 and abs(long_result["score"] - window_scores.max()) <= TOLERANCE
    assert (long_result["window"]["start"], long_result["window"]["end"]) == spans[int(np.argmax(window_scores))]


def test_the_cohere_client_reranks_unchanged(rerank_url, reference):
    import cohere

    client = cohere.ClientV2(base_url=rerank_url, api_key="unused")
    response = client.rerank(model="bert-plain", query=QUERY, documents=DOCUMENTS, top_n=3)
    expected = reference("bert-plain").predict([(QUERY, document) for document in DOCUMENTS])
    assert [r.index for r in response.results] == list(np.argsort(-expected)[:3])
    assert np.abs([r.relevance_score for r in response.results] - np.sort(expected)[::-1][:3]).max() <= TOLERANCE


def test_cohere_and_jina_shapes(http, reference):
    documents = [{"text": text} for text in DOCUMENTS]
    for route in ("/v1/rerank", "/v2/rerank"):
        answer = http.post(route, json={"model": "st6-identity", "query": QUERY, "documents": documents,
                                        "return_documents": True})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["model"] == "st6-identity" and body["id"] and body["usage"]["total_tokens"] > 0
        expected = reference("st6-identity").predict([(QUERY, d) for d in DOCUMENTS])
        assert np.abs(ranked_scores(body["results"], len(DOCUMENTS), "relevance_score") - expected).max() <= TOLERANCE
        assert all(r["document"]["text"] == DOCUMENTS[r["index"]] for r in body["results"])


def test_predict_gives_each_label_as_the_classifier_does(http, folders):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = folders["bert-3-labels"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()

    def probabilities(*texts: str) -> dict[str, float]:
        with torch.inference_mode():
            logits = model(**tokenizer(*texts, return_tensors="pt")).logits[0]
        return dict(zip(model.config.id2label.values(), torch.softmax(logits, -1).tolist()))

    single = http.post("/predict", json={"model": "bert-3-labels", "inputs": TEXTS[0]}).json()
    pair = http.post("/predict", json={"model": "bert-3-labels", "inputs": [QUERY, TEXTS[1]]}).json()
    batch = http.post("/predict", json={"model": "bert-3-labels", "inputs": [[QUERY, TEXTS[1]], [TEXTS[2], QUERY]]})
    for answer, expected in ((single, probabilities(TEXTS[0])), (pair, probabilities(QUERY, TEXTS[1])),
                             (batch.json()[1], probabilities(TEXTS[2], QUERY))):
        assert [entry["score"] for entry in answer] == sorted((e["score"] for e in answer), reverse=True)
        assert {entry["label"] for entry in answer} == set(expected)
        assert max(abs(entry["score"] - expected[entry["label"]]) for entry in answer) <= TOLERANCE
    raw = http.post("/predict", json={"model": "bert-3-labels", "inputs": TEXTS[0], "raw_scores": True}).json()
    with torch.inference_mode():
        logits = model(**tokenizer(TEXTS[0], return_tensors="pt")).logits[0].tolist()
    assert max(abs(e["score"] - logits[model.config.label2id[e["label"]]]) for e in raw) <= TOLERANCE


def test_models_show_each_kind(http):
    cards = {card["id"]: card for card in http.get("/models").json()["data"]}
    assert cards["bert-plain"]["kind"] == "reranker" and cards["bert-plain"]["activation"] == "Sigmoid"
    assert cards["st6-identity"]["activation"] == "Identity" and cards["st6-identity"]["max_length"] == 48
    assert cards["bert-3-labels"]["kind"] == "classifier" and len(cards["bert-3-labels"]["labels"]) == 3
    assert cards["bert-plain"]["dim"] is None


def test_the_handle_reranks_and_predicts(rerank_url, reference):
    from cluster import EmbeddingClient, Ranked

    client = EmbeddingClient(app_name=APP_NAME)
    ranked = client.rerank(QUERY, DOCUMENTS + [LONG_DOCUMENT], model="bert-plain", top_n=4)
    assert len(ranked) == 4 and all(isinstance(r, Ranked) for r in ranked)
    expected = reference("bert-plain").predict([(QUERY, document) for document in DOCUMENTS])
    for r in ranked:
        if r.index < len(DOCUMENTS):
            assert abs(r.score - expected[r.index]) <= TOLERANCE and (r.start, r.end) == (0, len(DOCUMENTS[r.index]))
    assert [r.score for r in ranked] == sorted((r.score for r in ranked), reverse=True)
    pairs = [(QUERY, TEXTS[1]), (TEXTS[2], QUERY)]
    predictions = client.predict([list(pair) for pair in pairs], model="bert-3-labels")
    classifier = reference("bert-3-labels")
    labels = [classifier.model.config.id2label[i] for i in range(3)]
    for predicted, probabilities in zip(predictions, classifier.predict(pairs, apply_softmax=True)):
        assert [score for _, score in predicted] == sorted((score for _, score in predicted), reverse=True)
        assert max(abs(dict(predicted)[label] - value) for label, value in zip(labels, probabilities)) <= TOLERANCE
    awaited = asyncio.run(client.arerank(QUERY, DOCUMENTS, model="bert-plain"))
    assert [r.index for r in awaited] == list(np.argsort(-expected))
    assert asyncio.run(client.apredict([[QUERY, TEXTS[1]], [TEXTS[2], QUERY]], model="bert-3-labels")) == predictions


def test_an_embedding_model_cannot_predict(serve_cluster):
    answer = httpx.post(serve_cluster.url + "/predict", json={"model": "all-MiniLM-L6-v2", "inputs": "a"}, timeout=60)
    assert answer.status_code == 400 and "embedding" in answer.json()["error"]["message"]


def test_rerank_by_an_embedding_model_is_the_cosine_of_its_vectors(http, serve_cluster, minilm_path):
    from sentence_transformers import SentenceTransformer

    with httpx.Client(base_url=serve_cluster.url, timeout=120) as main:
        answer = main.post("/rerank", json={"model": "all-MiniLM-L6-v2", "query": QUERY, "texts": DOCUMENTS})
    assert answer.status_code == 200, answer.text
    model = SentenceTransformer(minilm_path, device="cpu")
    query, documents = model.encode([QUERY]), model.encode(DOCUMENTS)
    expected = (documents @ query[0]) / np.linalg.norm(documents, axis=1) / np.linalg.norm(query[0])
    assert np.abs(ranked_scores(answer.json(), len(DOCUMENTS)) - expected).max() <= 1e-5


@pytest.mark.parametrize("route, body, status, words", [
    ("/embed", {"model": "bert-plain", "inputs": ["a"]}, 400, ["reranker", "embedding"]),
    ("/v1/embeddings", {"model": "bert-3-labels", "input": "a"}, 400, ["classifier"]),
    ("/predict", {"model": "bert-plain", "inputs": [[QUERY, LONG_DOCUMENT]]}, 413, ["truncate"]),
    ("/rerank", {"model": "bert-3-labels", "query": QUERY, "texts": ["a"]}, 400, ["classifier", "reranker"]),
    ("/rerank", {"model": "bert-plain", "query": LONG_QUERY, "texts": [LONG_DOCUMENT]}, 413, ["half", "64"]),
    ("/rerank", {"model": "bert-plain", "query": QUERY, "texts": []}, 400, ["empty"]),
    ("/rerank", {"model": "bert-plain", "query": QUERY, "texts": ["fine", "  "]}, 400, ["texts[1]"]),
    ("/rerank", {"model": "bert-plain", "query": "", "texts": ["a"]}, 400, ["query"]),
    ("/rerank", {"model": "bert-plain", "query": QUERY, "texts": [LONG_DOCUMENT * 6], "window_overlap": 40},
     413, ["max_chunks_per_request=40"]),
    ("/rerank", {"model": "bert-plain", "query": QUERY, "texts": ["a"], "truncation_direction": "left",
                 "truncate": True}, 400, ["left"]),
    ("/v2/rerank", {"model": "bert-plain", "query": QUERY, "documents": ["a"], "top_n": 0}, 422, ["top_n"]),
    ("/rerank", {"model": "nope", "query": QUERY, "texts": ["a"]}, 404, ["nope"]),
])
def test_bad_requests_get_a_clear_error_and_the_cluster_keeps_serving(http, route, body, status, words):
    answer = http.post(route, json=body)
    assert answer.status_code == status, answer.text
    message = answer.json()["error"]["message"]
    assert all(word in message for word in words), message
    assert http.post("/rerank", json={"model": "bert-plain", "query": QUERY, "texts": ["a b"]}).status_code == 200


def test_embedding_routes_refuse_a_reranker_by_handle(rerank_url):
    from cluster import BadRequestError, EmbeddingClient

    with pytest.raises(BadRequestError, match="reranker"):
        EmbeddingClient(app_name=APP_NAME).embed(["a"], model="bert-plain")
