"""Late chunking through the cluster: ``/embed_chunks``, the handle, and ``embedding-cluster embed --chunks``."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from transformers import AutoModel, AutoTokenizer

from cluster import BadRequestError, Chunk, PayloadTooLargeError
from cluster.bulk import Chunking
from cluster.bulk_job import run_bulk_job
from cluster.config import ModelConfig
from references import reference_folded_output

REPO = Path(__file__).resolve().parents[2]
DOCUMENTS = [
    "Ray Serve runs the encoder. It batches requests from many clients, and the function above folds long "
    "inputs into segments. " * 20,
    "Café, naïve façade — déjà vu.   東京は日本の首都です。 Emoji 🙂 too.\n\nA second paragraph follows here. " * 4,
]


def cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def chunks_of(http, **body) -> dict:
    response = http.post("/embed_chunks", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_late_chunks_equal_the_plain_model_folded_by_hand(http, minilm_path):
    answer = chunks_of(http, inputs=DOCUMENTS, chunk_size=40, chunk_overlap=8)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    model = AutoModel.from_pretrained(minilm_path).eval()
    assert answer["object"] == "list" and answer["model"] == "all-MiniLM-L6-v2"
    assert answer["usage"]["prompt_tokens"] == sum(len(tokenizer(d)["input_ids"]) for d in DOCUMENTS)
    for document, entry in zip(DOCUMENTS, answer["data"]):
        encoding = tokenizer(document, add_special_tokens=False, return_offsets_mapping=True)
        pieces, offsets = encoding["input_ids"], encoding["offset_mapping"]
        # MiniLM's own length (256) folds the first document into several segments
        unfolded = reference_folded_output(model, pieces, [tokenizer.cls_token_id], [tokenizer.sep_token_id], 256)
        for chunk in entry["chunks"]:
            assert chunk["text"] == document[chunk["start"]:chunk["end"]]
            rows = [i + 1 for i, (s, e) in enumerate(offsets) if s >= chunk["start"] and e <= chunk["end"]]
            assert len(rows) == chunk["num_tokens"] <= 40
            expected = torch.nn.functional.normalize(unfolded[rows].mean(0), dim=-1).numpy()
            assert cosine(chunk["embedding"], expected) >= 0.99999
    assert len(tokenizer(DOCUMENTS[0])["input_ids"]) > 2 * 256


def test_chunk_context_equals_embed_of_each_chunk(http, minilm_path):
    from sentence_transformers import SentenceTransformer

    late = chunks_of(http, inputs=DOCUMENTS[1], chunk_size=24)["data"][0]["chunks"]
    alone = chunks_of(http, inputs=DOCUMENTS[1], chunk_size=24, context="chunk")["data"][0]["chunks"]
    assert [(c["start"], c["end"]) for c in alone] == [(c["start"], c["end"]) for c in late]
    texts = [c["text"] for c in alone]
    served = np.array(http.post("/embed", json={"inputs": texts}).json())
    np.testing.assert_allclose(np.array([c["embedding"] for c in alone]), served, atol=1e-5)
    reference = SentenceTransformer(minilm_path, device="cpu").encode(texts)
    assert cosine([c["embedding"] for c in alone], reference).min() >= 0.9999
    # each chunk keeps its document's context: late chunks differ from chunks embedded alone
    assert cosine([c["embedding"] for c in late], [c["embedding"] for c in alone]).max() < 0.99


def test_caller_spans_dimensions_and_normalize(http):
    document = DOCUMENTS[1]
    spans = [[0, 30], [30, 120], [10, 60]]
    answer = chunks_of(http, inputs=[document], spans=[spans], dimensions=64)["data"][0]["chunks"]
    assert [[c["start"], c["end"]] for c in answer] == spans
    assert all(c["text"] == document[c["start"]:c["end"]] for c in answer)
    vectors = np.array([c["embedding"] for c in answer])
    assert vectors.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    raw = chunks_of(http, inputs=[document], spans=[spans], normalize=False)["data"][0]["chunks"]
    assert not np.allclose(np.linalg.norm([c["embedding"] for c in raw], axis=1), 1.0)


@pytest.mark.parametrize("body, status, message", [
    ({"inputs": ""}, 400, "input[0] is empty"),
    ({"inputs": []}, 400, "empty list"),
    ({"inputs": "text", "chunk_size": 8, "chunk_overlap": 8}, 400, "chunk_overlap must be"),
    ({"inputs": "text", "chunk_size": 0}, 422, "chunk_size"),
    ({"inputs": "some text", "spans": [[[0, 99]]]}, 400, "inside the document"),
    ({"inputs": "some text", "spans": [[[3, 3]]]}, 400, "non-empty"),
    ({"inputs": "some text", "spans": [[[4, 5]]]}, 400, "holds no token"),
    ({"inputs": "some text", "spans": [[[0, 1, 2]]]}, 422, "spans"),
    ({"inputs": ["a", "b"], "spans": [[[0, 1]]]}, 400, "one list of"),
    ({"inputs": "text", "context": "paragraph"}, 422, "context"),
    ({"inputs": "text", "model": "gpt"}, 404, "no model named 'gpt'"),
    ({"inputs": ["x"] * 101}, 413, "101 inputs"),
    ({"inputs": "x" * 50_001}, 413, "characters"),
])
def test_bad_chunk_requests_are_clear(http, body, status, message):
    response = http.post("/embed_chunks", json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]
    assert http.post("/embed_chunks", json={"inputs": "still serving"}).status_code == 200


def test_handle_returns_chunks(client):
    chunks = client.embed_chunks(DOCUMENTS, chunk_size=32, chunk_overlap=4)
    assert len(chunks) == 2 and all(isinstance(c, Chunk) for c in chunks[0])
    first = chunks[0][0]
    assert first.text == DOCUMENTS[0][first.start:first.end] and first.vector.shape == (384,)
    assert first.vector.dtype == np.float32 and first.num_tokens <= 32
    alone = asyncio.run(client.aembed_chunks(DOCUMENTS[1], chunk_size=32, chunk_overlap=4, context="chunk"))
    assert [(c.start, c.end) for c in alone[0]] == [(c.start, c.end) for c in chunks[1]]
    with pytest.raises(BadRequestError, match="chunk_overlap"):
        client.embed_chunks(DOCUMENTS, chunk_size=4, chunk_overlap=5)
    with pytest.raises(PayloadTooLargeError):
        client.embed_chunks(["x"] * 101)


def test_bulk_cli_writes_a_row_per_chunk_and_resumes(tmp_path, serve_cluster, http, minilm_path):
    documents = [DOCUMENTS[0], DOCUMENTS[1], "", "short one", DOCUMENTS[1][:200]]
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t, "lang": "en"}) + "\n"
                              for i, t in enumerate(documents)))
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump({"models": [{"name": "minilm", "model_name": minilm_path, "dtype": "float32",
                                                  "num_cpus": 1}]}))
    command = [sys.executable, "-m", "cluster.cli", "embed", str(source), str(tmp_path / "out"), "--config",
               str(config), "--id-column", "id", "--chunks", "--chunk-size", "40", "--chunk-overlap", "8",
               "--rows-per-part", "4"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rows in: 5, rows out: 5, rows with an error: 1, chunks: " in result.stdout
    parts = sorted((tmp_path / "out").glob("part-*.parquet"))
    table = pq.read_table(parts)
    served = chunks_of(http, inputs=[d for d in documents if d], chunk_size=40, chunk_overlap=8)["data"]
    assert table.num_rows == sum(len(entry["chunks"]) for entry in served) + 1  # + the empty document's row
    rows = table.to_pylist()
    by_id = {}
    for row in rows:
        by_id.setdefault(row["id"], []).append(row)
        assert row["lang"] == "en" and row["text"] == documents[int(row["id"][4:])]
    assert by_id["doc-2"][0]["error"] == "text is empty or whitespace only" and by_id["doc-2"][0]["embedding"] is None
    for entry, document_id in zip(served, ["doc-0", "doc-1", "doc-3", "doc-4"]):
        got = sorted(by_id[document_id], key=lambda row: row["chunk_index"])
        assert [r["chunk_index"] for r in got] == list(range(len(entry["chunks"])))
        assert [(r["chunk_start"], r["chunk_end"], r["chunk_text"], r["num_tokens"]) for r in got] == [
            (c["start"], c["end"], c["text"], c["num_tokens"]) for c in entry["chunks"]]
        assert cosine([r["embedding"] for r in got], [c["embedding"] for c in entry["chunks"]]).min() >= 0.9999
    for part in parts:  # a part holds whole documents
        ids = pq.read_table(part, columns=["id", "chunk_index"]).to_pylist()
        assert ids[0]["chunk_index"] == 0
    # an interrupted run: drop the last part, resume (in this process, on the session's cluster), and get
    # the same rows back
    parts[-1].unlink()
    summary = run_bulk_job(str(source), tmp_path / "out", ModelConfig(name="minilm", model_name=minilm_path,
                                                                      dtype="float32", num_cpus=0.5),
                           id_column="id", chunks=Chunking(chunk_size=40, chunk_overlap=8), resume=True,
                           rows_per_part=4, show_progress=False, encode_actors=1)
    assert (summary.rows_in, summary.rows_out, summary.rows_with_error) == (5, 5, 1)
    again = pq.read_table(sorted((tmp_path / "out").glob("part-*.parquet")))
    key = ["id", "chunk_index"]
    assert sorted(again.select(key).to_pylist(), key=lambda r: (r["id"], r["chunk_index"])) == sorted(
        table.select(key).to_pylist(), key=lambda r: (r["id"], r["chunk_index"]))


def test_embed_dataset_chunks_in_a_users_pipeline(serve_cluster, http, minilm_path):
    import ray

    from cluster.bulk import embed_dataset

    model = ModelConfig(name="minilm", model_name=minilm_path, dtype="float32", num_cpus=0.5)
    ds = ray.data.from_items([{"id": i, "body": d} for i, d in enumerate(DOCUMENTS)])
    for context in ("document", "chunk"):
        rows = embed_dataset(ds, model, text_column="body", chunks=Chunking(chunk_size=24, context=context),
                             encode_actors=1, tokenize_actors=1).take_all()
        served = chunks_of(http, inputs=DOCUMENTS, chunk_size=24, context=context)["data"]
        for number, entry in enumerate(served):
            got = sorted((r for r in rows if r["id"] == number), key=lambda r: r["chunk_index"])
            assert [(r["chunk_start"], r["chunk_end"]) for r in got] == [(c["start"], c["end"]) for c in entry["chunks"]]
            assert cosine([r["embedding"] for r in got], [c["embedding"] for c in entry["chunks"]]).min() >= 0.9999
    with pytest.raises(ValueError, match="chunk_overlap"):
        Chunking(chunk_size=4, chunk_overlap=4)
