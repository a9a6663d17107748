"""Bulk SPLADE vectors with ray.data (``embedding-cluster embed --sparse``, ``run_sparse_job``,
``sparse_dataset``), against sentence-transformers' ``SparseEncoder`` and the plain masked-LM run segment
by segment, on the tiny sparse folders. Every job runs on the session's Ray instance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import yaml

from cluster.bulk_sparse import SPARSE_INDICES, SPARSE_VALUES, sparse_dataset
from cluster.config import ModelConfig
from sparse_folders import build_sparse, masked_lm_reference
from st_folders import LONG_TEXTS, TEXTS

ATOL = 1e-5
VOCABULARY = 30522
BAD_ROWS = [({"id": "empty", "text": ""}, "text is empty or whitespace only"),
            ({"id": "number", "text": 7}, "text is int, expected a string"),
            ({"id": "missing"}, "text is null")]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, minilm_path) -> dict[str, str]:
    return build_sparse(tmp_path_factory.mktemp("bulk-sparse"), minilm_path)


def fp32(folders, name: str, **options) -> ModelConfig:
    return ModelConfig(name=name, model_name=folders[name], dtype="float32", num_cpus=1, **options)


def dense(rows: list[dict]) -> np.ndarray:
    vectors = np.zeros((len(rows), VOCABULARY), dtype=np.float32)
    for vector, row in zip(vectors, rows):
        assert row[SPARSE_INDICES] == sorted(row[SPARSE_INDICES])
        vector[row[SPARSE_INDICES]] = row[SPARSE_VALUES]
    return vectors


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_array_equal(actual != 0, expected != 0)
    np.testing.assert_allclose(actual, expected, atol=ATOL)


def read_output(folder: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(part) for part in sorted(folder.glob("part-*.parquet")))


def test_cli_writes_sparse_columns_equal_to_sparse_encoder(tmp_path, serve_cluster, folders, monkeypatch, capsys):
    """``embed --sparse`` over short texts, long ones (folded: every segment pooled) and bad rows; in this
    process, on the session's Ray instance."""
    from sentence_transformers import SparseEncoder

    from cluster.cli import main

    texts = [*TEXTS[:4], *LONG_TEXTS[:2]]
    records = [{"id": f"t{i}", "text": text} for i, text in enumerate(texts)] + [row for row, _ in BAD_ROWS]
    source = tmp_path / "texts.jsonl"
    source.write_text("".join(json.dumps(record) + "\n" for record in records))
    config = tmp_path / "cluster.yaml"
    model = fp32(folders, "bert-splade-max")
    config.write_text(yaml.safe_dump({"models": [model.model_dump(mode="json", exclude={"autoscaling"})]}))
    monkeypatch.setattr("cluster.cli.join_ray", lambda *args, **kwargs: None)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    output = tmp_path / "out"
    assert main(["embed", str(source), str(output), "--config", str(config), "--sparse", "--id-column", "id",
                 "--rows-per-part", "4", "--encode-actors", "1"]) == 0
    out, err = capsys.readouterr()
    assert f"rows in: {len(records)}, rows out: {len(records)}, rows with an error: {len(BAD_ROWS)}" in out
    assert "sparse vectors" in err and "rows/s" in err  # the progress bar
    table = read_output(output)
    assert table.schema.field(SPARSE_INDICES).type == pa.list_(pa.int32())
    assert table.schema.field(SPARSE_VALUES).type == pa.list_(pa.float32())
    rows = {row["id"]: row for row in table.to_pylist()}
    reference = SparseEncoder(folders["bert-splade-max"], device="cpu")
    short = [rows[f"t{i}"] for i in range(4)]
    assert_same(dense(short), reference.encode(TEXTS[:4], convert_to_tensor=True).to_dense().numpy())
    long = [rows[f"t{i}"] for i in (4, 5)]
    length = reference.max_seq_length
    assert_same(dense(long), np.stack([masked_lm_reference(folders["bert-splade-max"], text, length)
                                       for text in LONG_TEXTS[:2]]))
    assert all(row["num_tokens"] > 3 * length for row in long)
    for record, error in BAD_ROWS:
        row = rows[record["id"]]
        assert row["error"] == error and row[SPARSE_INDICES] is None and row[SPARSE_VALUES] is None


@pytest.mark.parametrize("arguments, message", [
    (["--sparse", "--chunks"], "--chunks cannot be combined with --sparse"),
    (["--sparse", "--precision", "int8"], "--precision cannot be combined with --sparse"),
    (["--sparse", "--task", "query", "--max-active-dims", "0"], "max_active_dims must be a positive integer"),
    (["--max-active-dims", "5"], "pass --sparse"),
])
def test_cli_refuses_what_a_sparse_job_cannot_do(tmp_path, folders, capsys, arguments, message):
    from cluster.cli import main

    source = tmp_path / "texts.jsonl"
    source.write_text(json.dumps({"text": "a"}) + "\n")
    config = tmp_path / "cluster.yaml"
    model = fp32(folders, "bert-splade-max")
    config.write_text(yaml.safe_dump({"models": [model.model_dump(mode="json", exclude={"autoscaling"})]}))
    assert main(["embed", str(source), str(tmp_path / "out"), "--config", str(config), *arguments]) == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_sparse_on_an_embedding_model(tmp_path, capsys):
    from cluster.cli import main

    source = tmp_path / "texts.jsonl"
    source.write_text(json.dumps({"text": "a"}) + "\n")
    assert main(["embed", str(source), str(tmp_path / "out"), "--sparse"]) == 2
    assert "of kind 'embedding': sparse vectors need a SparseEncoder" in capsys.readouterr().err


def test_dataset_routes_and_plain_masked_lm(serve_cluster, folders):
    """``sparse_dataset`` on an inference-free model's query route (``encode_query``: its query prompt, no
    transformer) and on a plain masked-LM folder served with ``pooling: splade`` (``SparseEncoder(folder)``)."""
    from sentence_transformers import SparseEncoder

    texts = TEXTS[:5]
    ds = ray.data.from_items([{"text": text, "n": i} for i, text in enumerate(texts)])
    queries = sparse_dataset(ds, fp32(folders, "inference-free"), task="query", encode_actors=1).take_all()
    inference_free = SparseEncoder(folders["inference-free"], device="cpu")
    assert [row["n"] for row in queries] == list(range(len(texts)))
    assert_same(dense(queries), inference_free.encode_query(texts, convert_to_tensor=True).to_dense().numpy())
    plain = sparse_dataset(ds, fp32(folders, "plain-masked-lm", pooling="splade"), max_active_dims=9,
                           encode_actors=1).take_all()
    expected = SparseEncoder(folders["plain-masked-lm"], device="cpu").encode(texts, convert_to_tensor=True,
                                                                              max_active_dims=9)
    assert_same(dense(plain), expected.to_dense().numpy())
    assert all(len(row[SPARSE_INDICES]) == 9 for row in plain)
    with pytest.raises(ValueError, match="masked-LM head"):
        sparse_dataset(ds, ModelConfig(name="minilm", pooling="splade"))
