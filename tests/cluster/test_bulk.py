"""Bulk embedding with ray.data: the CLI and embed_dataset in a user's own pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml

from cluster.bulk import embed_dataset
from cluster.bulk_job import run_bulk_job
from cluster.config import ModelConfig

REPO = Path(__file__).resolve().parents[2]
WORDS = ("bulk jobs embed every document of a corpus so that a vector store can search them by meaning "
         "and the cluster folds long documents instead of cutting them").split()


def corpus(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    lengths = rng.choice([3, 12, 40, 120], size=count)
    lengths[::37] = 1300  # a few long documents, folded into three segments
    return [" ".join(rng.choice(WORDS, size=n)) for n in lengths]


def cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def fp32_model(minilm_path) -> ModelConfig:
    return ModelConfig(name="all-MiniLM-L6-v2", model_name=minilm_path, dtype="float32", num_cpus=1)


def read_output(folder: Path) -> pa.Table:
    return pq.read_table(sorted(folder.glob("part-*.parquet")))


def test_cli_jsonl_to_parquet_matches_the_serving_path(tmp_path, http, fp32_model):
    texts = corpus(300)
    texts[5], texts[6] = "", None
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t, "lang": "en"}) + "\n"
                              for i, t in enumerate(texts)))
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump({"models": [fp32_model.model_dump(mode="json", exclude={"autoscaling"})]}))
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "embed", str(source), str(tmp_path / "out"),
                             "--config", str(config), "--id-column", "id", "--rows-per-part", "100"],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rows in: 300, rows out: 300, rows with an error: 2, tokens: " in result.stdout
    assert "rows/s" in result.stderr  # the progress bar
    table = read_output(tmp_path / "out")
    assert len(list((tmp_path / "out").glob("part-*.parquet"))) == 3
    assert sorted(table.column("id").to_pylist()) == sorted(f"doc-{i}" for i in range(300))
    assert set(table.column("lang").to_pylist()) == {"en"}
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    rows = {row["id"]: row for row in table.to_pylist()}
    assert rows["doc-5"]["error"] == "text is empty or whitespace only" and rows["doc-5"]["embedding"] is None
    assert rows["doc-6"]["error"] == "text is null" and rows["doc-6"]["embedding"] is None
    good = [i for i, t in enumerate(texts) if t]
    served = np.concatenate([np.array(http.post("/embed", json={"inputs": [texts[i] for i in chunk]}).json())
                             for chunk in np.array_split(good, 6)])
    bulk = np.array([rows[f"doc-{i}"]["embedding"] for i in good])
    assert cosine(bulk, served).min() >= 0.9999
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(fp32_model.model_name)
    assert rows["doc-0"]["num_tokens"] == len(tokenizer(texts[0], verbose=False)["input_ids"]) > 1300


def test_parquet_csv_txt_in_a_folder(tmp_path, serve_cluster, fp32_model, http):
    texts = corpus(40, seed=1)
    folder = tmp_path / "inputs"
    (folder / "nested").mkdir(parents=True)
    pq.write_table(pa.table({"id": list(range(20)), "body": texts[:20]}), folder / "a.parquet")
    pacsv.write_csv(pa.table({"id": list(range(20, 30)), "body": texts[20:30]}), folder / "nested" / "b.csv")
    (folder / "c.txt").write_text("\n".join(texts[30:]) + "\n")  # one text a line: the text column itself
    summary = run_bulk_job(str(folder), tmp_path / "out", fp32_model, text_column="body", show_progress=False,
                           encode_actors=1)
    assert (summary.rows_in, summary.rows_out, summary.rows_with_error) == (40, 40, 0)
    table = read_output(tmp_path / "out")
    assert sorted(table.column("body").to_pylist()) == sorted(texts)
    assert sorted(i for i in table.column("id").to_pylist() if i is not None) == list(range(30))
    by_text = {row["body"]: row["embedding"] for row in table.to_pylist()}
    sample = [texts[0], texts[25], texts[35]]
    served = np.array(http.post("/embed", json={"inputs": sample}).json())
    assert cosine(np.array([by_text[t] for t in sample]), served).min() >= 0.9999
    pq.write_table(pa.table({"id": [1], "content": ["x"]}), tmp_path / "other.parquet")
    with pytest.raises(KeyError, match="no column 'body'"):
        run_bulk_job(str(tmp_path / "other.parquet"), tmp_path / "never", fp32_model, text_column="body",
                     show_progress=False)
    with pytest.raises(FileNotFoundError, match="no input files"):
        run_bulk_job(str(tmp_path / "*.jsonl"), tmp_path / "never", fp32_model, show_progress=False)


def test_resume_after_an_interrupted_run(tmp_path, serve_cluster, fp32_model):
    texts = corpus(120, seed=2)
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    output = tmp_path / "out"
    first = run_bulk_job(str(source), output, fp32_model, id_column="id", rows_per_part=20, batch_size=20,
                         show_progress=False, encode_actors=1)
    assert first.rows_out == 120
    parts = sorted(output.glob("part-*.parquet"))
    assert len(parts) == 6
    # what a crash leaves: two parts never written, one cut short, one temporary file
    parts[1].unlink()
    parts[4].unlink()
    parts[2].write_bytes(parts[2].read_bytes()[:300])
    (output / f".{parts[3].name}.tmp").write_bytes(b"partial")
    lost = 60
    with pytest.raises(FileExistsError, match="--resume"):
        run_bulk_job(str(source), output, fp32_model, id_column="id", show_progress=False)
    second = run_bulk_job(str(source), output, fp32_model, id_column="id", resume=True, rows_per_part=20,
                          batch_size=20, show_progress=False, encode_actors=1)
    assert (second.rows_in, second.rows_out, second.rows_resumed) == (120, 120, 120 - lost)
    ids = read_output(output).column("id").to_pylist()
    assert sorted(ids) == list(range(120)), "duplicate or missing ids after --resume"
    assert not list(output.glob(".*.tmp"))


def test_embed_dataset_in_a_users_pipeline(serve_cluster, fp32_model, http):
    import ray

    items = [{"doc_id": i, "body": text, "score": i / 10} for i, text in enumerate(corpus(25, seed=3))]
    ds = ray.data.from_items(items).filter(lambda row: row["doc_id"] % 5 != 0)
    rows = embed_dataset(ds, fp32_model, text_column="body", output_column="vector", encode_actors=1).take_all()
    assert sorted(r["doc_id"] for r in rows) == [i for i in range(25) if i % 5]
    by_id = {r["doc_id"]: r for r in rows}
    assert by_id[3]["score"] == pytest.approx(0.3) and by_id[3]["error"] is None
    served = np.array(http.post("/embed", json={"inputs": [items[3]["body"], items[7]["body"]]}).json())
    assert cosine(np.array([by_id[3]["vector"], by_id[7]["vector"]]), served).min() >= 0.9999
    pieces = embed_dataset(ray.data.from_items(items[:3]), fp32_model, text_column="body", level="wordpiece",
                           encode_actors=1).take_all()
    assert [len(p["embedding"]) for p in pieces] == [p["num_tokens"] for p in pieces]
