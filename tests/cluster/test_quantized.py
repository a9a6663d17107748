"""Quantized vectors (``precision``) over HTTP, the openai client, the handle and bulk, against
sentence-transformers' ``quantize_embeddings`` with the same ranges.

The session cluster's ``all-MiniLM-L6-v2`` has ``quantization_ranges`` (a ``.npy`` file) and
``tiny-bert`` a ``calibration_corpus``; ``minilm-bf16`` has no ranges. Bit-for-bit checks quantize the
cluster's own float32 answer; the end-to-end checks against ``SentenceTransformer.encode`` (fp32)
allow one step only where the reference value lies within 1e-6 of a bucket edge (a sign, for binary).
"""

from __future__ import annotations

import asyncio
import base64
import pickle
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster import BadRequestError
from cluster.bulk import Chunking, EncodeStage, TokenizeStage, embed_dataset
from cluster.cli import main
from cluster.config import ModelConfig
from embedder.quantization import ranges_digest, read_calibration_corpus

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from sentence_transformers.quantization import quantize_embeddings

MODEL = "all-MiniLM-L6-v2"
QUANTIZED = ("int8", "uint8", "binary", "ubinary")
DTYPES = {"int8": np.int8, "uint8": np.uint8, "binary": np.int8, "ubinary": np.uint8}
TEXTS = ["A man is eating food.", "Ray Serve scales Python services.", "quantized vectors keep indexes small",
         "Binary vectors make a fast first pass; int8 ones rescore the candidates.", "ok"]
DOCUMENT = ("Late chunking pools every chunk from the encoding of its whole document. " * 6
            + "Quantized chunk vectors are quantized one by one, after that pooling.")


@pytest.fixture(scope="module")
def ranges(minilm_ranges_path) -> np.ndarray:
    return np.load(minilm_ranges_path)


def embed(http, precision: str | None = None, **body) -> np.ndarray:
    body = {"inputs": TEXTS, **body} | ({} if precision is None else {"precision": precision})
    response = http.post("/embed", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    if precision in DTYPES:
        assert all(type(value) is int for value in answer[0])  # integers, not floats
    return np.array(answer, dtype=DTYPES.get(precision, np.float32))


def near_edges_only(served: np.ndarray, expected: np.ndarray, reference: np.ndarray, precision: str,
                    ranges: np.ndarray) -> None:
    """``served`` equals ``expected`` (both quantized from float vectors that differ by rounding:
    ``reference`` the one ``expected`` came from) but for values within 1e-6 of a bucket edge."""
    if precision in ("int8", "uint8"):
        difference = np.abs(served.astype(np.int32) - expected.astype(np.int32))
        assert difference.max() <= 1
        starts, steps = ranges[0], (ranges[1] - ranges[0]) / 255
        position = (reference.astype(np.float64) - starts) / steps
        off_edge = np.abs(position - np.round(position)) * steps
        assert (off_edge[difference == 1] <= 1e-6).all(), "a value away from an edge was quantized differently"
    else:
        bits = np.unpackbits(served.view(np.uint8) ^ expected.view(np.uint8), axis=-1)[:, :reference.shape[1]]
        assert (np.abs(reference[bits == 1]) <= 1e-6).all(), "a clear sign was packed differently"


# --- HTTP -------------------------------------------------------------------

def test_embed_precisions_equal_quantize_embeddings(http, ranges):
    floats = embed(http)
    for precision in QUANTIZED:
        quantized = embed(http, precision)
        np.testing.assert_array_equal(quantized, quantize_embeddings(floats, precision, ranges=ranges))
        alone = np.concatenate([embed(http, precision, inputs=text) for text in TEXTS])  # no batch mates
        np.testing.assert_array_equal(alone, quantized)
    assert embed(http, "binary").shape == (5, 48) and embed(http, "int8").shape == (5, 384)
    np.testing.assert_array_equal(embed(http, "float32"), floats)


def test_dimensions_cut_the_ranges_too(http, ranges):
    floats = embed(http, dimensions=64)  # cut, then normalized again
    for precision in ("int8", "ubinary"):
        np.testing.assert_array_equal(embed(http, precision, dimensions=64),
                                      quantize_embeddings(floats, precision, ranges=ranges[:, :64]))


def test_sentence_transformers_end_to_end(http, minilm_path, ranges):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(minilm_path, device="cpu").encode(TEXTS, convert_to_numpy=True)
    assert reference.dtype == np.float32
    for precision in QUANTIZED:
        near_edges_only(embed(http, precision), quantize_embeddings(reference, precision, ranges=ranges),
                        reference, precision, ranges)


def test_openai_client_float_and_base64(serve_cluster, ranges):
    from openai import OpenAI

    openai = OpenAI(base_url=f"{serve_cluster.url}/v1", api_key="not-needed", max_retries=0)
    floats = np.array([d.embedding for d in openai.embeddings.create(
        model=MODEL, input=TEXTS, encoding_format="float").data], dtype=np.float32)
    for precision in QUANTIZED:
        expected = quantize_embeddings(floats, precision, ranges=ranges)
        listed = openai.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float",
                                          extra_body={"precision": precision})
        np.testing.assert_array_equal(np.array([d.embedding for d in listed.data], dtype=DTYPES[precision]),
                                      expected)
        packed = openai.embeddings.create(model=MODEL, input=TEXTS, encoding_format="base64",
                                          extra_body={"precision": precision})
        decoded = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype=DTYPES[precision])
                            for d in packed.data])
        np.testing.assert_array_equal(decoded, expected)


def test_embed_chunks_quantizes_each_chunk(http, ranges):
    for context in ("document", "chunk"):
        body = {"inputs": [DOCUMENT, TEXTS[3]], "chunk_size": 16, "context": context}
        floats = http.post("/embed_chunks", json=body).json()["data"]
        for precision in ("int8", "binary"):
            answer = http.post("/embed_chunks", json=body | {"precision": precision})
            assert answer.status_code == 200, answer.text
            for plain, quantized in zip(floats, answer.json()["data"]):
                assert [(c["start"], c["end"]) for c in quantized["chunks"]] == [
                    (c["start"], c["end"]) for c in plain["chunks"]]
                vectors = np.array([c["embedding"] for c in plain["chunks"]], dtype=np.float32)
                np.testing.assert_array_equal(
                    np.array([c["embedding"] for c in quantized["chunks"]], dtype=DTYPES[precision]),
                    quantize_embeddings(vectors, precision, ranges=ranges))
    assert len(floats[0]) > 1


def test_refusals(http):
    for route, body in (("/embed", {"inputs": "x"}), ("/v1/embeddings", {"input": "x"}),
                        ("/embed_chunks", {"inputs": "x y z"})):
        answer = http.post(route, json=body | {"model": "minilm-bf16", "precision": "int8"})
        assert answer.status_code == 400, answer.text
        message = answer.json()["error"]["message"]
        assert "model 'minilm-bf16' has none" in message
        assert "quantization_ranges" in message and "calibration_corpus" in message
        assert http.post(route, json=body | {"precision": "int4"}).status_code == 422
        assert http.post(route, json=body | {"model": "minilm-bf16", "precision": "binary"}).status_code == 200
    cls = http.post("/embed", json={"inputs": "x", "precision": "int8", "pooling": "cls"})
    assert cls.status_code == 400 and "made for its mean pooling" in cls.json()["error"]["message"]
    raw = http.post("/embed", json={"inputs": "x", "precision": "uint8", "normalize": False})
    assert raw.status_code == 400 and "normalized vectors" in raw.json()["error"]["message"]
    assert http.post("/embed", json={"inputs": "x", "precision": "binary", "normalize": False}).status_code == 200


def test_models_show_the_ranges(http, minilm_ranges_path, calibration_corpus_path):
    cards = {card["id"]: card for card in http.get("/models").json()["data"]}
    minilm = cards[MODEL]
    assert minilm["precisions"] == ["float32", "int8", "uint8", "binary", "ubinary"]
    assert minilm["quantization_ranges"] == {"source": f"quantization_ranges: {minilm_ranges_path}",
                                             "digest": ranges_digest(np.load(minilm_ranges_path)), "dim": 384,
                                             "texts": None}
    tiny = cards["tiny-bert"]["quantization_ranges"]
    assert (tiny["source"], tiny["dim"], tiny["texts"]) == (f"calibration_corpus: {calibration_corpus_path}", 32, 40)
    assert cards["minilm-bf16"]["precisions"] == ["float32", "binary", "ubinary"]
    assert cards["minilm-bf16"]["quantization_ranges"] is None


def test_calibration_corpus_ranges(http, tiny_bert_path, calibration_corpus_path):
    """The corpus's vectors' min and max, as SentenceTransformer embeds it; the served int8 vectors
    are quantized in them."""
    from sentence_transformers import SentenceTransformer

    corpus = read_calibration_corpus(calibration_corpus_path)
    reference = SentenceTransformer(tiny_bert_path, device="cpu").encode(corpus)
    config = ModelConfig(name="tiny-bert", model_name=tiny_bert_path, max_length=32,
                         calibration_corpus=calibration_corpus_path).resolved()
    np.testing.assert_allclose(config.ranges.array, np.vstack((reference.min(0), reference.max(0))), atol=1e-5)
    card = {c["id"]: c for c in http.get("/models").json()["data"]}["tiny-bert"]["quantization_ranges"]
    assert card["digest"] == config.ranges.digest  # recomputed here: the same ranges
    floats = embed(http, model="tiny-bert", inputs=corpus[:6])
    for precision in ("int8", "uint8"):
        quantized = embed(http, precision, model="tiny-bert", inputs=corpus[:6])
        np.testing.assert_array_equal(quantized, quantize_embeddings(floats, precision, ranges=config.ranges.array))
        assert int(quantized.max()) - int(quantized.min()) > 200  # the corpus's own texts span the ranges


# --- the handle ---------------------------------------------------------------

def test_handle_precisions(client, http):
    for precision in QUANTIZED:
        vectors = client.embed(TEXTS, precision=precision)
        assert vectors.dtype == DTYPES[precision]
        np.testing.assert_array_equal(vectors, embed(http, precision))
    chunks = client.embed_chunks([DOCUMENT], chunk_size=16, precision="uint8")[0]
    served = http.post("/embed_chunks", json={"inputs": [DOCUMENT], "chunk_size": 16, "precision": "uint8"}).json()
    np.testing.assert_array_equal(np.stack([c.vector for c in chunks]),
                                  np.array([c["embedding"] for c in served["data"][0]["chunks"]], np.uint8))

    async def run():
        return await asyncio.gather(client.aembed(TEXTS[0], precision="int8"),
                                    client.aembed_chunks(DOCUMENT, chunk_size=16, precision="binary"))

    single, (async_chunks,) = asyncio.run(run())
    np.testing.assert_array_equal(single, embed(http, "int8")[:1])
    assert async_chunks[0].vector.dtype == np.int8 and async_chunks[0].vector.shape == (48,)
    with pytest.raises(BadRequestError, match="quantization_ranges"):
        client.embed("x", model="minilm-bf16", precision="uint8")
    with pytest.raises(BadRequestError, match="precision"):
        client.embed("x", precision="int4")


# --- configs --------------------------------------------------------------------

def test_ranges_belong_to_the_resolved_config(minilm_path, tiny_bert_path, minilm_ranges_path,
                                              calibration_corpus_path):
    from deployments.loading import load_encoder

    config = ModelConfig(name="m", model_name=minilm_path, quantization_ranges=minilm_ranges_path)
    assert config.ranges is None  # read when resolved (the app builder), then carried to the replicas
    resolved = config.resolved()
    assert resolved.resolved() == resolved and resolved.resolved().ranges is resolved.ranges
    assert pickle.loads(pickle.dumps(resolved)).ranges == resolved.ranges
    with pytest.raises(ValueError, match="both quantization_ranges and calibration_corpus"):
        ModelConfig(model_name=minilm_path, quantization_ranges=minilm_ranges_path,
                    calibration_corpus=calibration_corpus_path)
    wrong = ModelConfig(name="w", model_name=tiny_bert_path, quantization_ranges=minilm_ranges_path,
                        share_weights=False, dtype="float32").resolved()
    with pytest.raises(ValueError, match="cover 384 dimensions, but its vectors have 32"):
        load_encoder(wrong)


# --- bulk -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def quantized_model(minilm_path, minilm_ranges_path) -> ModelConfig:
    return ModelConfig(name=MODEL, model_name=minilm_path, dtype="float32", num_cpus=1, share_weights=False,
                       quantization_ranges=minilm_ranges_path).resolved()


def test_bulk_stages_write_quantized_columns(serve_cluster, quantized_model, ranges, tmp_path):
    """The bulk stages, run here on one table: each precision's column is the float32 column
    quantized, as fixed_size_list<int8 | uint8> of dim (or dim / 8) values; with late chunking too."""
    table = pa.table({"id": list(range(len(TEXTS) + 2)), "text": [*TEXTS, "", DOCUMENT]})
    sizes = {}
    for chunking in (None, Chunking(chunk_size=16)):
        tokenized = TokenizeStage(quantized_model, "text", False, None, chunking)(table)
        columns = {}
        for precision in ("float32", *QUANTIZED):
            stage = EncodeStage(quantized_model, "embedding", "pooled", None, None, 1, "test-quantized/",
                                chunking=chunking, precision=precision)
            out = stage(tokenized)
            columns[precision] = out.column("embedding")
            if chunking is None:
                pq.write_table(out.select(["id", "embedding"]), tmp_path / f"{precision}.parquet")
                sizes[precision] = (tmp_path / f"{precision}.parquet").stat().st_size
        floats = columns["float32"]
        valid = floats.is_valid().to_numpy(zero_copy_only=False)
        assert valid.sum() == len(floats) - 1  # the empty text's row has no vector, in every column
        reference = np.stack([np.asarray(v, np.float32) for v in floats.to_pylist() if v is not None])
        for precision in QUANTIZED:
            column = columns[precision]
            width = 384 if precision.endswith("int8") else 48
            assert column.type == pa.list_(pa.from_numpy_dtype(DTYPES[precision]), width)
            assert (column.is_valid().to_numpy(zero_copy_only=False) == valid).all()
            values = np.stack([np.asarray(v, DTYPES[precision]) for v in column.to_pylist() if v is not None])
            np.testing.assert_array_equal(values, quantize_embeddings(reference, precision, ranges=ranges))
    assert sizes["binary"] < sizes["int8"] < sizes["float32"] / 3


def test_embed_dataset_int8_matches_the_serving_path(serve_cluster, quantized_model, http, ranges):
    import ray

    ds = ray.data.from_items([{"text": t} for t in TEXTS])
    rows = embed_dataset(ds, quantized_model, precision="int8", encode_actors=1, batch_size=8).take_all()
    assert [len(r["embedding"]) for r in rows] == [384] * len(TEXTS)
    by_text = {r["text"]: np.asarray(r["embedding"], np.int8) for r in rows}
    bulk = np.stack([by_text[t] for t in TEXTS])
    floats = embed(http)  # another process's float32 vectors: equal up to rounding
    near_edges_only(bulk, quantize_embeddings(floats, "int8", ranges=ranges), floats, "int8", ranges)
    with pytest.raises(ValueError, match="quantization_ranges"):
        embed_dataset(ds, quantized_model.model_copy(update={"quantization_ranges": None}).resolved(),
                      precision="uint8")
    with pytest.raises(ValueError, match="level must be 'pooled'"):
        embed_dataset(ds, quantized_model, precision="binary", level="wordpiece")


def test_cli_refuses_int8_without_ranges_before_ray_starts(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"text": "x"}\n')
    assert main(["embed", str(tmp_path / "in.jsonl"), str(tmp_path / "out"), "--precision", "int8"]) == 2
    error = capsys.readouterr().err
    assert "quantization_ranges" in error and "calibration_corpus" in error
    assert not (tmp_path / "out").exists()
