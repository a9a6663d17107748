"""Every sentence-transformers setup through the real cluster (HTTP, the openai client, the handle,
bulk), against ``SentenceTransformer(folder).encode``.

The setups are served by an app of their own on the session's Ray instance, for this module only:
eleven more encoder replicas for the whole session would hold about 5 GB while the bulk and bench
tests start Ray instances of their own beside it.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from cluster.config import ModelConfig
from st_folders import LONG_TEXTS, SETUPS, TEXTS

SETUP_NAMES = [spec.name for spec in SETUPS]
APP_NAME = "st-models"
ROUTE_PREFIX = "/st"


@pytest.fixture(scope="module")
def st_url(module_app, st_folders) -> str:
    models = [ModelConfig(name=f"st-{setup}", model_name=path, dtype="float32", num_cpus=0.05)
              for setup, path in st_folders.items()]
    with module_app(APP_NAME, ROUTE_PREFIX, models) as url:
        yield url


@pytest.fixture(scope="module")
def http(st_url):
    with httpx.Client(base_url=st_url, timeout=120) as client:
        yield client


def cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def references(st_folders):
    """``SentenceTransformer`` per setup, loaded on first use."""
    from sentence_transformers import SentenceTransformer

    loaded: dict = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = SentenceTransformer(st_folders[name], device="cpu")
        return loaded[name]

    return get


def embed(http, **body) -> np.ndarray:
    response = http.post("/embed", json=body)
    assert response.status_code == 200, response.text
    return np.array(response.json())


@pytest.mark.parametrize("name", SETUP_NAMES)
def test_http_vectors_equal_sentence_transformers(http, references, name):
    model, expected_model = f"st-{name}", references(name)
    assert cosine(embed(http, inputs=TEXTS, model=model), expected_model.encode(TEXTS)).min() >= 0.9999
    for prompt_name in expected_model.prompts:
        expected = expected_model.encode(TEXTS, prompt_name=prompt_name)
        served = embed(http, inputs=TEXTS, model=model, prompt_name=prompt_name)
        assert cosine(served, expected).min() >= 0.9999, prompt_name
    literal = embed(http, inputs=TEXTS, model=model, prompt="passage: ")
    assert cosine(literal, expected_model.encode(TEXTS, prompt="passage: ")).min() >= 0.9999
    expected_model.tokenizer.truncation_side = "right"
    right = expected_model.encode(LONG_TEXTS)
    expected_model.tokenizer.truncation_side = "left"
    left = expected_model.encode(LONG_TEXTS)
    expected_model.tokenizer.truncation_side = "right"
    assert cosine(embed(http, inputs=LONG_TEXTS, model=model, truncate=True), right).min() >= 0.9999
    served_left = embed(http, inputs=LONG_TEXTS, model=model, truncate=True, truncation_direction="left")
    assert cosine(served_left, left).min() >= 0.9999


def test_models_show_what_the_folders_ask_for(http):
    cards = {card["id"]: card for card in http.get("/models").json()["data"]}
    dense = cards["st-bert-dense-normalize"]
    assert (dense["dim"], dense["wordpiece_dim"], dense["head"], dense["pooling"]) == (16, 32, ["Dense", "Normalize"],
                                                                                      ["cls"])
    qwen3 = cards["st-qwen3-lasttoken"]
    assert qwen3["pooling"] == ["lasttoken"] and qwen3["prompts"]["query"].startswith("Instruct: ")
    assert cards["st-st6-saved"]["default_prompt_name"] == "document"
    assert cards["st-bert-exclude-prompt"]["include_prompt"] is False
    assert cards["st-mpnet"]["max_length"] == 64 and cards["st-modernbert"]["max_length"] == 96
    assert cards["st-bert-weightedmean"]["head"] == ["LayerNorm"]
    assert cards["st-xlmr-e5"]["prompts"] == {"query": "query: ", "passage": "passage: ", "document": ""}


def test_openai_client_sends_prompts_in_extra_body(st_url, references):
    from openai import OpenAI

    openai = OpenAI(base_url=f"{st_url}/v1", api_key="not-needed")
    expected_model = references("xlmr-e5")
    response = openai.embeddings.create(model="st-xlmr-e5", input=TEXTS, extra_body={"prompt_name": "query"})
    vectors = np.array([d.embedding for d in response.data])
    assert cosine(vectors, expected_model.encode(TEXTS, prompt_name="query")).min() >= 0.9999
    prompted = sum(len(expected_model.tokenizer("query: " + t)["input_ids"]) for t in TEXTS)
    assert response.usage.prompt_tokens == prompted
    literal = openai.embeddings.create(model="st-xlmr-e5", input=TEXTS[0], extra_body={"prompt": "passage: "})
    assert cosine(literal.data[0].embedding, expected_model.encode(TEXTS[0], prompt_name="passage")) >= 0.9999


def test_prompt_and_pooling_errors_are_clear(http, references):
    unknown = http.post("/embed", json={"inputs": TEXTS, "model": "st-xlmr-e5", "prompt_name": "nope"})
    assert unknown.status_code == 400
    assert "unknown prompt_name 'nope'" in unknown.json()["error"]["message"]
    assert "['document', 'passage', 'query']" in unknown.json()["error"]["message"]
    both = http.post("/v1/embeddings", json={"input": "x", "model": "st-xlmr-e5", "prompt_name": "query",
                                             "prompt": "query: "})
    assert both.status_code == 400 and "not both" in both.json()["error"]["message"]
    wrong_type = http.post("/embed", json={"inputs": "x", "model": "st-bert-mean", "prompt_name": 3})
    assert wrong_type.status_code == 422
    direction = http.post("/embed", json={"inputs": "x", "model": "st-bert-mean", "truncate": True,
                                          "truncation_direction": "middle"})
    assert direction.status_code == 422 and "truncation_direction" in direction.json()["error"]["message"]
    dense = http.post("/embed", json={"inputs": TEXTS, "model": "st-bert-dense-normalize", "pooling": ["cls", "max"]})
    assert dense.status_code == 400 and "Dense takes 32" in dense.json()["error"]["message"]
    # a pooling that fits the model's modules is honoured
    expected_model = references("bert-mean")
    expected_model[1].pooling_mode = "lasttoken"
    try:
        served = embed(http, inputs=TEXTS, model="st-bert-mean", pooling="lasttoken")
        assert cosine(served, expected_model.encode(TEXTS)).min() >= 0.9999
    finally:
        expected_model[1].pooling_mode = "mean"
    assert embed(http, inputs=TEXTS, model="st-bert-mean").shape == (len(TEXTS), 32)


def test_tokenize_and_token_vectors_include_the_prompt(http, references):
    expected_model = references("bert-cls-prompt")
    prompt = expected_model.prompts["query"]
    tokenized = http.post("/tokenize", json={"inputs": TEXTS[:2], "model": "st-bert-cls-prompt",
                                             "prompt_name": "query"}).json()
    ids = expected_model.tokenizer(prompt + TEXTS[0])["input_ids"]
    assert tokenized[0]["ids"] == ids
    assert tokenized[0]["prompt_length"] == expected_model[0]._get_prompt_length(prompt)
    assert http.post("/tokenize", json={"inputs": "x", "model": "st-bert-cls-prompt"}).json()[0]["prompt_length"] is None
    tokens = http.post("/embed_tokens", json={"inputs": TEXTS[:2], "model": "st-bert-cls-prompt",
                                              "prompt_name": "query"}).json()
    expected = expected_model.encode(TEXTS[:2], prompt_name="query", output_value="token_embeddings")
    for served, reference in zip(tokens, expected):
        assert len(served["tokens"]) == len(reference)
        assert cosine(served["embeddings"], reference.numpy()).min() >= 0.9999


def test_handle_and_bulk_take_prompts(st_url, references, st_folders):
    import ray

    from cluster import EmbeddingClient
    from cluster.bulk import embed_dataset

    client = EmbeddingClient(app_name=APP_NAME)
    expected_model = references("qwen3-lasttoken")
    expected = expected_model.encode(TEXTS, prompt_name="query")
    vectors = client.embed(TEXTS, model="st-qwen3-lasttoken", prompt_name="query")
    assert cosine(vectors, expected).min() >= 0.9999
    model = ModelConfig(name="qwen3", model_name=st_folders["qwen3-lasttoken"], dtype="float32", num_cpus=0.5)
    ds = ray.data.from_items([{"id": i, "text": text} for i, text in enumerate(TEXTS)])
    rows = sorted(embed_dataset(ds, model, prompt_name="query", encode_actors=1, tokenize_actors=1).take_all(),
                  key=lambda row: row["id"])
    assert cosine(np.array([row["embedding"] for row in rows]), expected).min() >= 0.9999
    with pytest.raises(ValueError, match="unknown prompt_name"):
        embed_dataset(ds, model, prompt_name="nope")


def test_late_chunking_needs_mean_pooling(http, references):
    document = " ".join(TEXTS)
    refused = http.post("/embed_chunks", json={"inputs": document, "model": "st-bert-cls-prompt"})
    assert refused.status_code == 400 and "pools with cls" in refused.json()["error"]["message"]
    forced = http.post("/embed_chunks", json={"inputs": document, "model": "st-bert-cls-prompt", "pooling": "mean"})
    assert forced.status_code == 200 and forced.json()["data"][0]["chunks"]
    alone = http.post("/embed_chunks", json={"inputs": document, "model": "st-bert-cls-prompt", "chunk_size": 8,
                                             "context": "chunk", "prompt_name": "query"}).json()["data"][0]["chunks"]
    expected = references("bert-cls-prompt").encode([c["text"] for c in alone], prompt_name="query")
    assert len(alone) > 2 and cosine([c["embedding"] for c in alone], expected).min() >= 0.9999
