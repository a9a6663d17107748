"""Bulk embedding with ray.data: the CLI and embed_dataset in a user's own pipeline.

One real ``embedding-cluster embed`` subprocess (``cli_run``, on a Ray instance of its own, as a user runs
it) serves every test that checks its output or resumes from it; the rest run in this process, on the
session's Ray instance.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml
from ray.exceptions import UserCodeException

from cluster.bulk import INPUT_ERROR_COLUMN, Chunking, check_input_columns, embed_dataset
from cluster.bulk_job import MANIFEST, run_bulk_job
from cluster.config import LimitsSettings, ModelConfig
from cluster.sources import parse_json_lines

REPO = Path(__file__).resolve().parents[2]
WORDS = ("bulk jobs embed every document of a corpus so that a vector store can search them by meaning "
         "and the cluster folds long documents instead of cutting them").split()
CLI_ROWS, CLI_ROWS_PER_PART = 120, 20


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


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def holders_named(prefix: str) -> list[str]:
    import ray

    from deployments.weight_store import STORE_NAME, STORE_NAMESPACE

    store = ray.get_actor(STORE_NAME, namespace=STORE_NAMESPACE)
    return [user for user in ray.get(store.holders.remote()) if user.startswith(prefix)]


@dataclass
class CliRun:
    texts: list[str | None]
    source: Path
    output: Path
    result: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, fp32_model) -> CliRun:
    """``embedding-cluster embed`` once, in a subprocess (which starts and stops its own Ray instance)."""
    folder = tmp_path_factory.mktemp("cli-run")
    texts: list[str | None] = list(corpus(CLI_ROWS))
    texts[5], texts[6] = "", None
    source = write_jsonl(folder / "docs.jsonl", [{"id": f"doc-{i}", "text": t, "lang": "en"}
                                                 for i, t in enumerate(texts)])
    config = folder / "cluster.yaml"
    config.write_text(yaml.safe_dump({"models": [fp32_model.model_dump(mode="json", exclude={"autoscaling"})]}))
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "embed", str(source), str(folder / "out"),
                             "--config", str(config), "--id-column", "id", "--rows-per-part", str(CLI_ROWS_PER_PART),
                             "--encode-actors", "1"],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    return CliRun(texts=texts, source=source, output=folder / "out", result=result)


def test_cli_jsonl_to_parquet_matches_the_serving_path(cli_run, http, fp32_model):
    result, texts = cli_run.result, cli_run.texts
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"rows in: {CLI_ROWS}, rows out: {CLI_ROWS}, rows with an error: 2, tokens: " in result.stdout
    assert "rows/s" in result.stderr  # the progress bar
    table = read_output(cli_run.output)
    assert len(list(cli_run.output.glob("part-*.parquet"))) == CLI_ROWS // CLI_ROWS_PER_PART
    assert sorted(table.column("id").to_pylist()) == sorted(f"doc-{i}" for i in range(CLI_ROWS))
    assert set(table.column("lang").to_pylist()) == {"en"}
    assert INPUT_ERROR_COLUMN not in table.column_names
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    rows = {row["id"]: row for row in table.to_pylist()}
    assert rows["doc-5"]["error"] == "text is empty or whitespace only" and rows["doc-5"]["embedding"] is None
    assert rows["doc-6"]["error"] == "text is null" and rows["doc-6"]["embedding"] is None
    good = [i for i, t in enumerate(texts) if t]
    served = np.concatenate([np.array(http.post("/embed", json={"inputs": [texts[i] for i in chunk]}).json())
                             for chunk in np.array_split(good, 3)])
    bulk = np.array([rows[f"doc-{i}"]["embedding"] for i in good])
    assert cosine(bulk, served).min() >= 0.9999
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(fp32_model.model_name)
    assert rows["doc-0"]["num_tokens"] == len(tokenizer(texts[0], verbose=False)["input_ids"]) > 1300


def test_resume_after_an_interrupted_run(cli_run, tmp_path, serve_cluster, fp32_model):
    assert cli_run.result.returncode == 0, cli_run.result.stderr[-3000:]
    output = tmp_path / "out"
    shutil.copytree(cli_run.output, output)
    parts = sorted(output.glob("part-*.parquet"))
    assert len(parts) == 6
    # what a crash leaves: two parts never written, one cut short, one temporary file
    parts[1].unlink()
    parts[4].unlink()
    parts[2].write_bytes(parts[2].read_bytes()[:300])
    (output / f".{parts[3].name}.tmp").write_bytes(b"partial")
    lost = 3 * CLI_ROWS_PER_PART
    with pytest.raises(FileExistsError, match="--resume"):
        run_bulk_job(str(cli_run.source), output, fp32_model, id_column="id", show_progress=False)
    second = run_bulk_job(str(cli_run.source), output, fp32_model, id_column="id", resume=True,
                          rows_per_part=CLI_ROWS_PER_PART, show_progress=False, encode_actors=1)
    assert (second.rows_in, second.rows_out, second.rows_resumed) == (CLI_ROWS, CLI_ROWS, CLI_ROWS - lost)
    assert second.rows_with_error == 2
    ids = read_output(output).column("id").to_pylist()
    assert sorted(ids) == sorted(f"doc-{i}" for i in range(CLI_ROWS)), "duplicate or missing ids after --resume"
    assert not list(output.glob(".*.tmp"))


def test_a_folder_the_job_did_not_write_is_refused_and_left_alone(tmp_path, fp32_model):
    """A Spark output, or the input folder itself, given as OUTPUT: nothing in it is read or removed."""
    source = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": "some text"}])
    foreign = tmp_path / "spark-output"
    foreign.mkdir()
    pq.write_table(pa.table({"other": [1, 2]}), foreign / "part-00000-c0ffee.snappy.parquet")
    (foreign / "_SUCCESS").write_text("")
    before = sorted((p.name, p.stat().st_size) for p in foreign.iterdir())
    for resume in (True, False):
        with pytest.raises(FileExistsError, match="no embedding-cluster job wrote it"):
            run_bulk_job(str(source), foreign, fp32_model, id_column="id", resume=resume, show_progress=False)
    assert sorted((p.name, p.stat().st_size) for p in foreign.iterdir()) == before


def test_resume_refuses_null_or_repeated_ids_before_embedding(tmp_path, serve_cluster, fp32_model):
    output = tmp_path / "out"
    output.mkdir()
    unreadable = output / "part-earlier-00000.parquet"
    unreadable.write_bytes(b"cut short")  # a resume that got going would remove it
    (output / MANIFEST).write_text(json.dumps([unreadable.name]))  # the job's own part
    repeated = write_jsonl(tmp_path / "repeated.jsonl", [{"id": i, "text": f"text {n}"}
                                                         for n, i in enumerate([0, 1, 2, 1, 3, 3, 3])])
    with pytest.raises(ValueError, match=r"2 'id' values of the input occur in more than one row \(3 duplicate "
                                         r"rows; e\.g\. '1' in 2 rows\); --resume tells"):
        run_bulk_job(str(repeated), output, fp32_model, resume=True, show_progress=False)
    missing = tmp_path / "missing.parquet"
    pq.write_table(pa.table({"key": ["a", None, "c", None], "text": ["first", "second", "third", "fourth"]}),
                   missing)
    with pytest.raises(ValueError, match=r"2 rows of the input have no 'key' \(e\.g\. the row \{'text': 'second'\}\)"):
        run_bulk_job(str(missing), output, fp32_model, id_column="key", resume=True, show_progress=False)
    assert unreadable.exists() and sorted(p.name for p in output.iterdir()) == [MANIFEST, unreadable.name]
    # an id column given without --resume is checked too: the run that a resume would finish
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "a", "text": "fine"}\nnot json\n')
    with pytest.raises(ValueError, match=r"1 row of the input has no 'id' \(e\.g\. the row \{\} \(line is not a "
                                         r"JSON object\)\)"):
        run_bulk_job(str(broken), tmp_path / "fresh", fp32_model, id_column="id", show_progress=False)
    assert not list((tmp_path / "fresh").iterdir())


def test_an_input_column_the_job_writes_is_refused(tmp_path, serve_cluster, fp32_model):
    # the user's 'error' in the second file only: every block counts, not the first one's schema
    folder = tmp_path / "docs"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"id": 0, "text": "plain"}])
    write_jsonl(folder / "b.jsonl", [{"id": 1, "text": "noted", "error": "checked by hand"}])
    with pytest.raises(ValueError, match=r"the input already has the column 'error' \(why a row has no vector\), "
                                         r"which the embedding job writes itself; rename that column"):
        run_bulk_job(str(folder), tmp_path / "out", fp32_model, show_progress=False)
    vectors = tmp_path / "vectors.parquet"
    pq.write_table(pa.table({"text": ["a"], "num_tokens": [3], "embedding": [[0.5]]}), vectors)
    with pytest.raises(ValueError, match=r"columns 'num_tokens' \(the wordpieces of each text\), 'embedding' "):
        run_bulk_job(str(vectors), tmp_path / "out", fp32_model, show_progress=False)
    chunked = tmp_path / "chunked.parquet"
    pq.write_table(pa.table({"text": ["a"], "chunk_text": ["a"]}), chunked)
    with pytest.raises(ValueError, match=r"'chunk_text' \(the chunks\)"):
        run_bulk_job(str(chunked), tmp_path / "out", fp32_model, chunks=Chunking(), show_progress=False)
    assert not list((tmp_path / "out").iterdir())


def test_embed_dataset_refuses_a_column_it_writes(serve_cluster, fp32_model):
    import ray

    rows = [{"text": "one", "error": None}, {"text": "two", "error": "a note"}]
    with pytest.raises(ValueError, match="'error'"):  # the schema is known: before anything runs
        embed_dataset(ray.data.from_items(rows), fp32_model, encode_actors=1, tokenize_actors=1)
    with pytest.raises(ValueError, match="'vector' \\(the vectors\\)"):
        embed_dataset(ray.data.from_items([{"text": "one", "vector": 1}]), fp32_model, output_column="vector")

    def add_error(table: pa.Table) -> pa.Table:
        return table.append_column("error", pa.array(["a note"] * table.num_rows))

    late = ray.data.from_items([{"text": "one"}]).map_batches(add_error, batch_format="pyarrow")
    # known only once it runs: the tokenize stage refuses it (and ray.data wraps the ValueError)
    with pytest.raises(UserCodeException, match="ValueError: the input already has the column 'error'"):
        embed_dataset(late, fp32_model, encode_actors=1, tokenize_actors=1).take_all()


def test_a_row_past_the_serving_limits_fails_alone(serve_cluster, fp32_model):
    """Bulk rows meet the serving path's per-request limits: the long row gets its error, the others
    their vectors, from the same block."""
    import ray

    rows = [{"text": "a short text"}, {"text": "word " * 500}, {"text": "another short one"}]
    limits = LimitsSettings(max_chars_per_input=1000, max_wordpieces_per_request=400)
    out = embed_dataset(ray.data.from_items(rows), fp32_model, encode_actors=1, tokenize_actors=1, limits=limits,
                        prompt="query: ").take_all()
    by_text = {row["text"]: row for row in out}
    long = by_text["word " * 500]
    assert long["embedding"] is None and "max_chars_per_input=1000" in long["error"]
    assert all(by_text[text]["error"] is None and len(by_text[text]["embedding"]) == 384
               for text in ("a short text", "another short one"))
    wordy = embed_dataset(ray.data.from_items([{"text": "w " * 450}, {"text": "fine"}]), fp32_model,
                          encode_actors=1, tokenize_actors=1, limits=limits).take_all()
    assert "max_wordpieces_per_request=400" in wordy[0]["error"] and wordy[1]["error"] is None


def test_check_input_columns_knows_every_column_written():
    check_input_columns(["id", "text", "chunk_text", "lang"])
    check_input_columns(["embedding"], output_column="vector")
    for column in ("embedding", "num_tokens", "error", "__token_ids"):
        with pytest.raises(ValueError, match=repr(column)):
            check_input_columns(["text", column])
    for column in ("chunk_index", "chunk_start", "chunk_end", "chunk_text"):
        with pytest.raises(ValueError, match=rf"{column!r} \(the chunks\)"):
            check_input_columns(["text", column], chunks=Chunking(context="chunk"))


def test_json_lines_keep_every_field_and_say_which_lines_are_broken():
    lines = ['{"id": 1, "text": "a", "error": "the user\'s note"}', "not json", '{"id": 3, "text": 7}']
    table = parse_json_lines(pa.table({"text": lines}), "text")
    assert table.column("error").to_pylist() == ["the user's note", None, None]
    assert table.column("id").to_pylist() == [1, None, 3]
    assert table.column("text").to_pylist() == ["a", None, None]
    assert table.column(INPUT_ERROR_COLUMN).to_pylist() == [None, "line is not a JSON object",
                                                            "text is int, expected a string"]


def test_parquet_csv_txt_jsonl_in_a_folder(tmp_path, serve_cluster, fp32_model, http):
    texts = corpus(40, seed=1)
    folder = tmp_path / "inputs"
    (folder / "nested").mkdir(parents=True)
    pq.write_table(pa.table({"id": list(range(20)), "body": texts[:20]}), folder / "a.parquet")
    pacsv.write_csv(pa.table({"id": list(range(20, 30)), "body": texts[20:30]}), folder / "nested" / "b.csv")
    (folder / "c.txt").write_text("\n".join(texts[30:]) + "\n")  # one text a line: the text column itself
    (folder / "d.jsonl").write_text('{"id": 40, "body": "a line of JSON", "lang": "en"}\nnot json\n')
    summary = run_bulk_job(str(folder), tmp_path / "out", fp32_model, text_column="body", show_progress=False,
                           encode_actors=1)
    assert (summary.rows_in, summary.rows_out, summary.rows_with_error) == (42, 42, 1)
    table = read_output(tmp_path / "out")
    assert INPUT_ERROR_COLUMN not in table.column_names
    assert sorted(t for t in table.column("body").to_pylist() if t) == sorted([*texts, "a line of JSON"])
    assert sorted(i for i in table.column("id").to_pylist() if i is not None) == [*range(30), 40]
    by_text = {row["body"]: row for row in table.to_pylist()}
    assert by_text["a line of JSON"]["lang"] == "en" and by_text["a line of JSON"]["error"] is None
    assert by_text[None]["error"] == "line is not a JSON object" and by_text[None]["embedding"] is None
    sample = [texts[0], texts[25], texts[35]]
    served = np.array(http.post("/embed", json={"inputs": sample}).json())
    assert cosine(np.array([by_text[t]["embedding"] for t in sample]), served).min() >= 0.9999
    pq.write_table(pa.table({"id": [1], "content": ["x"]}), tmp_path / "other.parquet")
    with pytest.raises(KeyError, match="no column 'body'"):
        run_bulk_job(str(tmp_path / "other.parquet"), tmp_path / "never", fp32_model, text_column="body",
                     show_progress=False)
    with pytest.raises(FileNotFoundError, match="no input files"):
        run_bulk_job(str(tmp_path / "*.jsonl"), tmp_path / "never", fp32_model, show_progress=False)


def test_embed_dataset_in_a_users_pipeline(serve_cluster, fp32_model, http):
    import ray

    items = [{"doc_id": i, "body": text, "score": i / 10} for i, text in enumerate(corpus(25, seed=3))]
    ds = ray.data.from_items(items).filter(lambda row: row["doc_id"] % 5 != 0)
    weights_user = f"test-pipeline-{uuid.uuid4().hex[:8]}/"
    embedded = embed_dataset(ds, fp32_model, text_column="body", output_column="vector", encode_actors=1,
                             weights_user=weights_user, batch_size=4)
    # several blocks, none fetched ahead: the pool is still up after the first one
    batches = iter(embedded.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0))
    rows = next(batches).to_pylist()
    (holder,) = holders_named(weights_user)  # the encode actor's own name, under the caller's prefix
    assert holder.startswith(f"{weights_user}{fp32_model.name}/")
    rows += [row for batch in batches for row in batch.to_pylist()]
    deadline = time.monotonic() + 60  # ray.data shuts the pool down once the dataset is consumed
    while holders_named(weights_user) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert holders_named(weights_user) == [], "the encode actors kept their weights after the dataset ended"
    assert sorted(r["doc_id"] for r in rows) == [i for i in range(25) if i % 5]
    by_id = {r["doc_id"]: r for r in rows}
    assert by_id[3]["score"] == pytest.approx(0.3) and by_id[3]["error"] is None
    served = np.array(http.post("/embed", json={"inputs": [items[3]["body"], items[7]["body"]]}).json())
    assert cosine(np.array([by_id[3]["vector"], by_id[7]["vector"]]), served).min() >= 0.9999
    pieces = embed_dataset(ray.data.from_items(items[:3]), fp32_model, text_column="body", level="wordpiece",
                           encode_actors=1).take_all()
    assert [len(p["embedding"]) for p in pieces] == [p["num_tokens"] for p in pieces]
