"""Sparse (SPLADE) models served by the cluster (HTTP and the handle), against sentence-transformers'
``SparseEncoder`` and the plain masked-LM run segment by segment."""

from __future__ import annotations

from functools import cache

import httpx
import numpy as np
import pytest
import scipy.sparse

from cluster.config import ModelConfig
from sparse_folders import build_sparse, masked_lm_reference
from st_folders import LONG_TEXTS, TEXTS

APP_NAME = "sparse-test"
ROUTE_PREFIX = "/sparse"
SERVED = ("bert-splade-max", "bert-splade-sum", "inference-free", "plain-masked-lm")
#: What a model's config adds: a plain masked-LM folder is served as SPLADE only when asked.
OPTIONS = {"plain-masked-lm": {"pooling": "splade"}}
ATOL = 1e-5


@pytest.fixture(scope="module")
def folders(tmp_path_factory, minilm_path) -> dict[str, str]:
    return build_sparse(tmp_path_factory.mktemp("served-sparse"), minilm_path)


@pytest.fixture(scope="module")
def sparse_url(module_app, folders) -> str:
    models = [ModelConfig(name=name, model_name=folders[name], dtype="float32", num_cpus=0.05, torch_threads=1,
                          **OPTIONS.get(name, {})) for name in SERVED]
    with module_app(APP_NAME, ROUTE_PREFIX, models) as url:
        yield url


@pytest.fixture(scope="module")
def http(sparse_url):
    with httpx.Client(base_url=sparse_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def reference(folders):
    from sentence_transformers import SparseEncoder

    return cache(lambda name: SparseEncoder(folders[name], device="cpu"))


def dense(answer: list[list[dict]], vocabulary: int) -> np.ndarray:
    rows = np.zeros((len(answer), vocabulary), dtype=np.float32)
    for row, entries in zip(rows, answer):
        for entry in entries:
            row[entry["index"]] = entry["value"]
    return rows


def assert_same(actual: np.ndarray, expected: np.ndarray, rtol: float = 0.0) -> None:
    np.testing.assert_array_equal(actual != 0, expected != 0)
    np.testing.assert_allclose(actual, expected, atol=ATOL, rtol=rtol)


@pytest.mark.parametrize("name", SERVED)
def test_embed_sparse_equals_sparse_encoder(http, reference, name):
    answer = http.post("/embed_sparse", json={"model": name, "inputs": TEXTS[:4]})
    assert answer.status_code == 200, answer.text
    expected = reference(name).encode(TEXTS[:4], convert_to_tensor=True).to_dense().numpy()
    assert_same(dense(answer.json(), expected.shape[1]), expected)
    assert all([e["index"] for e in entries] == sorted(e["index"] for e in entries) for entries in answer.json())


def test_query_and_document_routes_of_an_inference_free_model(http, reference):
    model = reference("inference-free")
    for task, encode in (("query", model.encode_query), ("document", model.encode_document)):
        answer = http.post("/embed_sparse", json={"model": "inference-free", "inputs": TEXTS[:3], "task": task})
        assert answer.status_code == 200, answer.text
        expected = encode(TEXTS[:3], convert_to_tensor=True).to_dense().numpy()
        assert_same(dense(answer.json(), expected.shape[1]), expected)


def test_long_inputs_are_folded_and_pooled_over_every_segment(http, folders):
    cards = {card["id"]: card for card in http.get("/models").json()["data"]}
    for name in ("bert-splade-max", "bert-splade-sum"):
        card = cards[name]
        assert card["kind"] == "sparse" and card["dim"] == 30522
        prompt = card["prompts"].get(card["default_prompt_name"] or "", "") or None
        answer = http.post("/embed_sparse", json={"model": name, "inputs": LONG_TEXTS[:2]}).json()
        expected = np.stack([masked_lm_reference(folders[name], text, card["max_length"], prompt)
                             for text in LONG_TEXTS[:2]])
        assert_same(dense(answer, card["dim"]), expected, rtol=1e-5 if name.endswith("sum") else 0.0)


def test_max_active_dims_and_tokens_equal_sentence_transformers(http, reference):
    model = reference("bert-splade-max")
    answer = http.post("/embed_sparse", json={"model": "bert-splade-max", "inputs": TEXTS[:2], "max_active_dims": 7,
                                              "return_tokens": True}).json()
    expected = model.encode(TEXTS[:2], convert_to_tensor=True, max_active_dims=7)
    assert_same(dense(answer, 30522), expected.to_dense().numpy())
    for entries, decoded in zip(answer, model.decode(expected)):
        assert {(e["token"], round(e["value"], 4)) for e in entries} == {(t, round(v, 4)) for t, v in decoded}


def test_the_handle_gives_a_csr_matrix(sparse_url, reference):
    import asyncio

    from cluster import EmbeddingClient

    client = EmbeddingClient(app_name=APP_NAME)
    matrix = client.embed_sparse(TEXTS[:3], model="bert-splade-sum")
    assert scipy.sparse.issparse(matrix) and matrix.shape == (3, 30522)
    expected = reference("bert-splade-sum").encode(TEXTS[:3], convert_to_tensor=True).to_dense().numpy()
    assert_same(matrix.toarray(), expected)
    awaited = asyncio.run(client.aembed_sparse(TEXTS[:3], model="inference-free", task="query"))
    query = reference("inference-free").encode_query(TEXTS[:3], convert_to_tensor=True).to_dense().numpy()
    assert_same(awaited.toarray(), query)


@pytest.mark.parametrize("route, body, status, words", [
    ("/embed_sparse", {"model": "bert-splade-max", "inputs": []}, 400, ["empty"]),
    ("/embed_sparse", {"model": "bert-splade-max", "inputs": ["a"], "max_active_dims": 0}, 422, ["max_active_dims"]),
    ("/embed_sparse", {"model": "bert-splade-max", "inputs": ["a"], "task": "title"}, 422, ["task"]),
    ("/embed", {"model": "bert-splade-max", "inputs": ["a"]}, 400, ["sparse"]),
    ("/rerank", {"model": "inference-free", "query": "a", "texts": ["b"]}, 400, ["sparse"]),
])
def test_bad_requests_get_a_clear_error(http, route, body, status, words):
    answer = http.post(route, json=body)
    assert answer.status_code == status, answer.text
    message = answer.json()["error"]["message"]
    assert all(word in message for word in words), message
    assert http.post("/embed_sparse", json={"model": "bert-splade-max", "inputs": ["still serving"]}).status_code == 200


def test_an_embedding_model_cannot_embed_sparse(serve_cluster):
    answer = httpx.post(serve_cluster.url + "/embed_sparse", json={"model": "all-MiniLM-L6-v2", "inputs": "a"},
                        timeout=60)
    assert answer.status_code == 400 and "sparse" in answer.json()["error"]["message"]


def test_splade_pooling_needs_a_masked_lm_folder(folders):
    """A plain masked-LM is an embedding model unless its config says ``pooling: splade``; on a folder
    without a masked-LM head that is refused where the config is resolved (at start-up)."""
    plain = folders["plain-masked-lm"]
    assert ModelConfig(name="plain", model_name=plain).kind == "embedding"
    assert ModelConfig(name="plain", model_name=plain, pooling="splade").resolved().kind == "sparse"
    with pytest.raises(ValueError, match="model 'minilm' cannot be served: pooling 'splade' needs the vocabulary"):
        ModelConfig(name="minilm", pooling="splade").resolved()
    with pytest.raises(ValueError, match="normalize only apply to embedding models"):
        ModelConfig(name="plain", model_name=plain, pooling="splade", normalize=True).resolved()
