"""The clients people already use, from their own documentation's examples, against the real cluster:
TEI's (``huggingface_hub.InferenceClient`` at the root, SageMaker's ``/invocations``), OpenAI's
(``models.list``, token-id input), LangChain's ``OpenAIEmbeddings`` and LlamaIndex's TEI embedding."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoModel, AutoTokenizer

from references import plain_sentence_vectors

TEXTS = ["A man is eating food.", "Ray Serve scales Python services."]
MODEL = "all-MiniLM-L6-v2"


def cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def reference(minilm_path) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_path, device="cpu").encode(TEXTS)


@pytest.fixture(scope="module")
def openai_client(serve_cluster):
    import openai

    return openai.OpenAI(base_url=serve_cluster.url + "/v1", api_key="unused", max_retries=0)


def test_huggingface_inference_client_posts_to_the_root(serve_cluster, reference, monkeypatch):
    import huggingface_hub.constants
    from huggingface_hub import InferenceClient

    # the suite's offline switch blocks every request of huggingface_hub's, even to this loopback server
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    vectors = InferenceClient(base_url=serve_cluster.url).feature_extraction(TEXTS[0])
    assert vectors.shape == (1, 384)
    assert cosine(vectors[0], reference[0]) >= 0.9999


def test_sagemaker_invocations_route(http, reference):
    response = http.post("/invocations", json={"inputs": TEXTS})
    assert response.status_code == 200
    assert cosine(np.array(response.json()), reference).min() >= 0.9999


def test_openai_models_list(openai_client, cluster_config):
    models = openai_client.models.list()
    assert [model.id for model in models.data] == [m.name for m in cluster_config.models]
    assert all(model.object == "model" and model.created > 0 for model in models.data)


def test_openai_token_id_input_is_the_models_own_ids(openai_client, minilm_path, reference):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    ids = tokenizer(TEXTS)["input_ids"]
    one = openai_client.embeddings.create(model=MODEL, input=ids[0])
    assert len(one.data) == 1 and cosine(one.data[0].embedding, reference[0]) >= 0.9999
    assert one.usage.prompt_tokens == len(ids[0])
    both = openai_client.embeddings.create(model=MODEL, input=ids)
    assert cosine([d.embedding for d in both.data], reference).min() >= 0.9999


def test_long_token_id_input_is_folded_like_text(openai_client, tiny_bert_path):
    text = " ".join(f"word{i}" for i in range(60))  # far past tiny-bert's 32 wordpieces
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_path)
    ids = tokenizer(text)["input_ids"]
    assert len(ids) > 64
    answer = openai_client.embeddings.create(model="tiny-bert", input=[ids])
    expected = plain_sentence_vectors(AutoModel.from_pretrained(tiny_bert_path).eval(), tokenizer, [text], 32)
    assert cosine(answer.data[0].embedding, expected[0]) >= 0.9995  # tiny-bert runs in bf16 where the CPU has it
    assert answer.usage.prompt_tokens == len(ids)


def test_langchain_openai_embeddings(serve_cluster, reference):
    from langchain_openai import OpenAIEmbeddings

    # tiktoken's ids mean nothing to another model's vocabulary: LangChain must send the texts
    embeddings = OpenAIEmbeddings(base_url=serve_cluster.url + "/v1", api_key="unused", model=MODEL,
                                  check_embedding_ctx_length=False, max_retries=0)
    assert cosine(embeddings.embed_documents(TEXTS), reference).min() >= 0.9999
    assert cosine(embeddings.embed_query(TEXTS[1]), reference[1]) >= 0.9999


def test_llama_index_text_embeddings_inference(serve_cluster, reference):
    from llama_index.embeddings.text_embeddings_inference import TextEmbeddingsInference

    embedding = TextEmbeddingsInference(base_url=serve_cluster.url, model_name=MODEL, timeout=60)
    assert cosine(embedding.get_text_embedding_batch(TEXTS), reference).min() >= 0.9999
