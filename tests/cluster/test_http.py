"""Every HTTP route against the real cluster, with independent references."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from transformers import AutoModel, AutoTokenizer

from references import plain_sentence_vectors

SENTENCES = ["A man is eating food.", "Ray Serve scales Python services.",
             "Embeddings turn text into vectors that search engines compare."]


def cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def sentence_transformer(minilm_path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_path, device="cpu")


def test_health_docs_and_models(http, cluster_config):
    assert http.get("/health").json() == {"status": "ok", "models": sorted(m.name for m in cluster_config.models)}
    assert http.get("/docs").status_code == 200
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/v1/embeddings", "/embed", "/embed_tokens", "/embed_chunks", "/tokenize", "/models", "/health",
            "/ready"} <= set(paths)
    cards = {card["id"]: card for card in http.get("/models").json()["data"]}
    minilm = cards["all-MiniLM-L6-v2"]
    assert (minilm["dim"], minilm["dtype"], minilm["layers"], minilm["max_length"]) == (384, "float32", 6, 256)
    assert (minilm["pooling"], minilm["normalize"], minilm["device"]) == (["mean"], True, "cpu")
    assert (minilm["prompts"], minilm["default_prompt_name"], minilm["head"]) == (
        {"query": "", "document": ""}, None, ["Normalize"])
    assert minilm["replicas"] == {"running": 1} and minilm["status"] == "HEALTHY"
    assert cards["minilm-bf16"]["dtype"] == "bfloat16"
    assert (cards["tiny-bert"]["dim"], cards["tiny-bert"]["normalize"]) == (32, False)


def test_embed_equals_sentence_transformers(http, sentence_transformer):
    reference = sentence_transformer.encode(SENTENCES)
    fp32 = np.array(http.post("/embed", json={"inputs": SENTENCES}).json())
    assert fp32.shape == (3, 384)
    assert cosine(fp32, reference).min() >= 0.9999
    bf16 = np.array(http.post("/embed", json={"inputs": SENTENCES, "model": "minilm-bf16"}).json())
    assert cosine(bf16, reference).min() >= 0.999
    single = http.post("/embed", json={"inputs": SENTENCES[0]}).json()
    assert cosine(single[0], reference[0]) >= 0.9999


def test_embed_options(http, sentence_transformer):
    raw = np.array(http.post("/embed", json={"inputs": SENTENCES, "normalize": False}).json())
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    cls = np.array(http.post("/embed", json={"inputs": SENTENCES, "pooling": "cls"}).json())
    mean = np.array(http.post("/embed", json={"inputs": SENTENCES}).json())
    assert cosine(cls, mean).max() < 0.99
    cut = np.array(http.post("/embed", json={"inputs": SENTENCES, "dimensions": 64}).json())
    assert cut.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1.0, rtol=1e-5)
    assert cosine(cut, mean[:, :64]).min() > 0.99999


def test_openai_client_unchanged(serve_cluster, sentence_transformer):
    from openai import OpenAI

    openai = OpenAI(base_url=f"{serve_cluster.url}/v1", api_key="not-needed")
    reference = sentence_transformer.encode(SENTENCES)
    default = openai.embeddings.create(model="all-MiniLM-L6-v2", input=SENTENCES)  # the client asks for base64
    floats = openai.embeddings.create(model="all-MiniLM-L6-v2", input=SENTENCES, encoding_format="float")
    for response in (default, floats):
        vectors = np.array([d.embedding for d in response.data])
        assert vectors.shape == (3, 384) and [d.index for d in response.data] == [0, 1, 2]
        assert cosine(vectors, reference).min() >= 0.9999
        assert response.usage.prompt_tokens == sum(len(sentence_transformer.tokenizer(s)["input_ids"])
                                                   for s in SENTENCES)
    short = openai.embeddings.create(model="all-MiniLM-L6-v2", input="hello", dimensions=16)
    assert len(short.data[0].embedding) == 16


def plain_wordpieces(path: str, text: str) -> np.ndarray:
    """The plain transformers model's last hidden state for one text, specials included."""
    with torch.no_grad():
        return AutoModel.from_pretrained(path).eval()(**AutoTokenizer.from_pretrained(path)(
            text, return_tensors="pt")).last_hidden_state[0].numpy()


def test_base64_encoding_is_little_endian_float32(http):
    floats = http.post("/v1/embeddings", json={"input": SENTENCES, "encoding_format": "float"}).json()
    encoded = http.post("/v1/embeddings", json={"input": SENTENCES, "encoding_format": "base64"}).json()
    for plain, packed in zip(floats["data"], encoded["data"]):
        decoded = np.frombuffer(base64.b64decode(packed["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(decoded, np.array(plain["embedding"], dtype=np.float32))


def test_tokenize_and_embed_tokens(http, minilm_path):
    tokens = http.post("/tokenize", json={"inputs": ["AllenNLP is great"]}).json()
    assert tokens == [{"tokens": ["[CLS]", "allen", "##nl", "##p", "is", "great", "[SEP]"],
                       "ids": [101, 5297, 20554, 2361, 2003, 2307, 102], "num_segments": 1,
                       "word_offsets": None, "prompt_length": None}]
    long_text = "folding " * 1200
    folded = http.post("/tokenize", json={"inputs": [long_text]}).json()[0]
    # segments of 256 wordpieces (MiniLM's max_seq_length), 254 of them text
    assert folded["num_segments"] == 5 and len(folded["tokens"]) == 1202
    pieces = http.post("/embed_tokens", json={"inputs": ["AllenNLP is great"]}).json()[0]
    assert pieces["tokens"] == tokens[0]["tokens"]
    np.testing.assert_allclose(np.array(pieces["embeddings"]), plain_wordpieces(minilm_path, "AllenNLP is great"),
                               atol=1e-4)


def test_word_level_with_an_empty_word(http, client, minilm_path):
    words = [["AllenNLP", "", "is", "great"], ["one"]]
    answer = http.post("/embed_tokens", json={"words": words, "level": "word"}).json()
    assert [a["tokens"] for a in answer] == words
    vectors = np.array(answer[0]["embeddings"])
    assert vectors.shape == (4, 384) and np.all(vectors[1] == 0) and np.isfinite(vectors).all()
    pieces = plain_wordpieces(minilm_path, "AllenNLP is great")  # [CLS] allen ##nl ##p is great [SEP]
    np.testing.assert_allclose(vectors[0], pieces[1:4].mean(0), atol=1e-4)
    first = http.post("/embed_tokens", json={"words": words, "level": "word", "sub_token_mode": "first"}).json()
    np.testing.assert_allclose(np.array(first[0]["embeddings"][0]), pieces[1], atol=1e-4)
    through_handle = client.embed_tokens(words=words, level="word")
    np.testing.assert_allclose(through_handle[0], vectors, atol=1e-6)
    assert through_handle[1].shape == (1, 384)


def test_second_model_routes_and_folds(http, tiny_bert_path):
    texts = ["a tiny model", "a text long enough to be folded into a few segments of thirty-two " * 4]
    answer = np.array(http.post("/embed", json={"inputs": texts, "model": "tiny-bert"}).json())
    assert answer.shape == (2, 32)
    expected = plain_sentence_vectors(AutoModel.from_pretrained(tiny_bert_path).eval(),
                                      AutoTokenizer.from_pretrained(tiny_bert_path), texts, max_length=32)
    assert cosine(answer, expected).min() >= 0.9999  # bf16 on a CPU with AVX512_BF16: "auto" dtype
    assert http.post("/embed", json={"inputs": texts, "model": "nope"}).status_code == 404


def test_scalar_mix_served_against_the_plain_models_layers(http, tiny_bert_path):
    """A model served with last_layer_only=False mixes every hidden layer (uniform weights at first),
    also across folded segments."""
    from references import reference_folded_output

    text = "the scalar mix of every layer, served over HTTP and folded into segments of sixteen " * 2
    answer = http.post("/embed_tokens", json={"inputs": [text], "model": "tiny-mix"}).json()[0]
    tokenizer, model = AutoTokenizer.from_pretrained(tiny_bert_path), AutoModel.from_pretrained(tiny_bert_path)
    pieces = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(pieces) > 2 * 16
    layers = [reference_folded_output(lambda **kw: (model.eval()(**kw, output_hidden_states=True).hidden_states[i],),
                                      pieces, [tokenizer.cls_token_id], [tokenizer.sep_token_id], 16)
              for i in range(1, model.config.num_hidden_layers + 1)]
    expected = torch.stack(layers).mean(0).numpy()
    assert len(answer["tokens"]) == len(pieces) + 2
    np.testing.assert_allclose(np.array(answer["embeddings"]), expected, atol=1e-4)


def test_64_concurrent_requests_never_mix_answers(http, minilm_path):
    rng = np.random.default_rng(7)
    vocabulary = ("search engine ranking vector embedding cluster replica batch token segment model "
                  "query document index latency throughput").split()
    requests = []
    for number in range(64):
        size = int(rng.integers(1, 4))
        lengths = [int(rng.integers(2, 30)) for _ in range(size)]
        if number % 8 == 0:
            lengths[0] = 2100  # over 2,000 wordpieces: folded into nine segments of 256
        requests.append([" ".join(rng.choice(vocabulary, n)) for n in lengths])
    with ThreadPoolExecutor(max_workers=64) as pool:
        answers = list(pool.map(lambda texts: http.post("/embed", json={"inputs": texts}), requests))
    assert all(a.status_code == 200 for a in answers)
    model, tokenizer = AutoModel.from_pretrained(minilm_path).eval(), AutoTokenizer.from_pretrained(minilm_path)
    for texts, answer in zip(requests, answers):
        expected = plain_sentence_vectors(model, tokenizer, texts, max_length=256, normalize=True)
        assert cosine(np.array(answer.json()), expected).min() >= 0.99999
