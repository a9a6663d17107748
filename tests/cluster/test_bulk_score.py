"""Bulk reranking with ray.data (``embedding-cluster score``, ``run_score_job``, ``score_dataset``), against
sentence-transformers' ``CrossEncoder`` on the tiny reranker folders.

Every job runs on the session's Ray instance, the CLI's too (in this process).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from functools import cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from cluster.bulk_score import ScoreStage, check_score_columns, run_score_job, score_dataset
from cluster.config import ModelConfig
from reranker_folders import RERANKERS
from st_folders import TEXTS, TRAINING_TEXT

TOLERANCE = 1e-5
SETUPS = ("bert-plain", "xlmr-reranker", "bert-3-labels-sigmoid")
QUERIES = ["what is the capital of France?", "quick brown fox", ""]
_WORDS = sorted(set(re.findall(r"[A-Za-zéèçïà]+", TRAINING_TEXT)))
LONG_QUERY = " ".join(["Paris is the capital and most populous city of France, again and again."] * 4)
MAX_WINDOWS, ROWS_PER_PART = 8, 10


def long_document(seed: int, sentences: int) -> str:
    """A document longer than the rerankers' 64 tokens, no two windows alike."""
    generator = random.Random(seed)
    return " ".join(f"{' '.join(generator.choice(_WORDS) for _ in range(generator.randint(5, 11))).capitalize()} "
                    f"{number}." for number in range(sentences))


LONG_DOCUMENTS = [long_document(seed, 12) for seed in range(3)]
#: 10 windows (444 wordpieces): planned, then refused by max_windows; and one refused before it is planned.
TOO_MANY_WINDOWS, FAR_TOO_MANY = long_document(7, 44), long_document(8, 200)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, minilm_path) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bulk-rerankers")
    for spec in RERANKERS:
        if spec.name in SETUPS:
            spec.build(root / spec.name, minilm_path)
    return {name: str(root / name) for name in SETUPS}


@pytest.fixture(scope="module")
def reference(folders):
    """``CrossEncoder(folder)`` and the library's scorer (for ``plan_windows``), loaded once each."""
    from sentence_transformers import CrossEncoder

    from embedder import CrossEncoderScorer

    @cache
    def load(name: str):
        return CrossEncoder(folders[name], device="cpu"), CrossEncoderScorer(folders[name], device="cpu")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load
    torch.set_num_threads(threads)


def fp32(folders, name: str) -> ModelConfig:
    return ModelConfig(name=name, model_name=folders[name], dtype="float32", num_cpus=1)


def write_jsonl(path: Path, records: list[dict | str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def read_output(folder: Path) -> pa.Table:
    return pq.read_table(sorted(folder.glob("part-*.parquet")))


GOOD = [(q, d) for q in QUERIES for d in TEXTS] + [(q, d) for q in QUERIES[:2] for d in LONG_DOCUMENTS]
BAD = [  # (query, document, the row's error)
    (None, "a document", "query is null"),
    (7, "a document", "query is int, expected a string"),
    ("a query", None, "document is null"),
    ("a query", ["not", "text"], "document is list, expected a string"),
    ("a query", "", "document is empty or whitespace only"),
    ("a query", " \n ", "document is empty or whitespace only"),
    ("a query", TOO_MANY_WINDOWS, rf"the document needs \d+ windows of max_length 64, more than max_windows "
                                  rf"{MAX_WINDOWS}$"),
    ("a query", FAR_TOO_MANY, rf"the document's \d+ wordpieces need more than max_windows {MAX_WINDOWS} windows"),
    (LONG_QUERY, LONG_DOCUMENTS[0], r"the query has \d+ tokens, more than half of max_length 64"),
]


@pytest.fixture(scope="module")
def scored(tmp_path_factory, serve_cluster, folders):
    """One job over the good and the bad pairs, by bert-plain, in parts of ``ROWS_PER_PART`` rows."""
    folder = tmp_path_factory.mktemp("bulk-score")
    pairs = [*GOOD, *((query, document) for query, document, _ in BAD)]
    rows = [{"id": f"pair-{i}", "query": q, "text": d, "lang": "en"} for i, (q, d) in enumerate(pairs)]
    source = write_jsonl(folder / "pairs.jsonl", rows)
    summary = run_score_job(str(source), folder / "out", fp32(folders, "bert-plain"), id_column="id",
                            max_windows=MAX_WINDOWS, rows_per_part=ROWS_PER_PART, score_actors=1,
                            show_progress=False)
    return source, folder / "out", summary


def test_scores_and_windows_are_cross_encoders(scored, reference):
    _, output, summary = scored
    total = len(GOOD) + len(BAD)
    assert (summary.rows_in, summary.rows_out, summary.rows_with_error) == (total, total, len(BAD))
    assert summary.line().startswith(f"rows in: {total}, rows out: {total}, rows with an error: {len(BAD)}, seconds")
    table = read_output(output)
    assert table.schema.field("score").type == pa.float32()
    assert table.schema.field("window_start").type == table.schema.field("window_end").type == pa.int64()
    assert set(table.column("lang").to_pylist()) == {"en"}
    rows = {row["id"]: row for row in table.to_pylist()}
    assert sorted(rows) == sorted(f"pair-{i}" for i in range(total))
    cross_encoder, scorer = reference("bert-plain")
    good = [rows[f"pair-{i}"] for i in range(len(GOOD))]
    assert all(row["error"] is None for row in good)
    fits = [(row, pair) for row, pair in zip(good, GOOD) if pair[1] not in LONG_DOCUMENTS]
    expected = cross_encoder.predict([pair for _, pair in fits])
    assert np.abs(np.array([row["score"] for row, _ in fits]) - expected).max() <= TOLERANCE
    assert all((row["window_start"], row["window_end"]) == (0, len(pair[1])) for row, pair in fits)
    for row, (query, document) in zip(good, GOOD):
        if document not in LONG_DOCUMENTS:
            continue
        spans = scorer.plan_windows(query, document)
        windows = cross_encoder.predict([(query, document[start:end]) for start, end in spans])
        assert len(spans) > 2
        assert abs(row["score"] - windows.max()) <= TOLERANCE
        assert (row["window_start"], row["window_end"]) == spans[int(windows.argmax())]
    for number, (*_, error) in enumerate(BAD, start=len(GOOD)):
        row = rows[f"pair-{number}"]
        assert re.match(error, row["error"]), (row["error"], error)
        assert row["score"] is row["window_start"] is row["window_end"] is None


def test_resume_scores_only_the_missing_ids(scored, tmp_path, folders):
    source, first_output, first = scored
    output = tmp_path / "out"
    shutil.copytree(first_output, output)
    parts = sorted(output.glob("part-*.parquet"))
    assert len(parts) == -(-first.rows_out // ROWS_PER_PART)
    lost = sum(pq.read_metadata(part).num_rows for part in parts[1:3])
    for part in parts[1:3]:
        part.unlink()
    (output / f".{parts[1].name}.tmp").write_bytes(b"partial")
    model = fp32(folders, "bert-plain")
    with pytest.raises(FileExistsError, match="--resume"):
        run_score_job(str(source), output, model, id_column="id", show_progress=False)
    second = run_score_job(str(source), output, model, id_column="id", resume=True, max_windows=MAX_WINDOWS,
                           rows_per_part=ROWS_PER_PART, score_actors=1, show_progress=False)
    assert (second.rows_in, second.rows_out, second.rows_resumed) == (first.rows_in, first.rows_in,
                                                                      first.rows_in - lost)
    assert second.rows_with_error == len(BAD)
    before, after = read_output(first_output), read_output(output)
    assert sorted(after.column("id").to_pylist()) == sorted(before.column("id").to_pylist())
    assert not list(output.glob(".*.tmp"))
    by_id = {row["id"]: row for row in before.to_pylist()}
    for row in after.to_pylist():
        if row["score"] is not None:
            assert abs(row["score"] - by_id[row["id"]]["score"]) <= TOLERANCE
        assert row["error"] == by_id[row["id"]]["error"]


def test_cli_truncates_as_cross_encoder_predict(tmp_path, serve_cluster, folders, reference, monkeypatch, capsys):
    """``embedding-cluster score --truncate`` on the XLM-R reranker, other column names, a line that is no JSON;
    in this process, on the session's Ray instance (the command neither joins another nor shuts it down)."""
    import ray

    from cluster.cli import main

    pairs = [(q, d) for q in (QUERIES[0], LONG_QUERY) for d in [*LONG_DOCUMENTS, TEXTS[0], TEXTS[3]]]
    records = [{"question": q, "passage": d} for q, d in pairs]
    source = write_jsonl(tmp_path / "pairs.jsonl", [*records, "not json"])
    config = tmp_path / "cluster.yaml"
    model = fp32(folders, "xlmr-reranker")
    config.write_text(yaml.safe_dump({"models": [model.model_dump(mode="json", exclude={"autoscaling"})]}))
    monkeypatch.setattr("cluster.cli.join_ray", lambda *args, **kwargs: None)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    assert main(["score", str(source), str(tmp_path / "out"), "--config", str(config), "--query-column", "question",
                 "--document-column", "passage", "--truncate", "--encode-actors", "1"]) == 0
    out, err = capsys.readouterr()
    assert f"rows in: {len(pairs) + 1}, rows out: {len(pairs) + 1}, rows with an error: 1, seconds" in out
    assert "scoring" in err and "rows/s" in err  # the progress bar
    assert main(["score", str(source), str(tmp_path / "out"), "--config", str(config)]) == 2
    assert "already holds results; pass --resume" in capsys.readouterr().err
    rows = read_output(tmp_path / "out").to_pylist()
    (broken,) = [row for row in rows if row["error"] is not None]
    assert broken["error"] == "line is not a JSON object" and broken["score"] is None
    by_pair = {(row["question"], row["passage"]): row for row in rows if row["error"] is None}
    cross_encoder, _ = reference("xlmr-reranker")
    expected = cross_encoder.predict(pairs)
    assert np.abs(np.array([by_pair[pair]["score"] for pair in pairs]) - expected).max() <= TOLERANCE
    for query, document in pairs:
        row = by_pair[(query, document)]
        assert 0 <= row["window_start"] < row["window_end"] <= len(document)
    assert by_pair[(QUERIES[0], LONG_DOCUMENTS[0])]["window_end"] < len(LONG_DOCUMENTS[0])  # cut, not windowed


def test_several_labels_raw_scores_in_a_users_pipeline(serve_cluster, folders, reference):
    import ray

    pairs = [(QUERIES[0], TEXTS[0]), (QUERIES[1], TEXTS[4]), (QUERIES[1], LONG_DOCUMENTS[1])]
    items = [{"key": i, "query": q, "body": d} for i, (q, d) in enumerate(pairs)]
    model = fp32(folders, "bert-3-labels-sigmoid")
    raw = score_dataset(ray.data.from_items(items), model, document_column="body", raw_scores=True,
                        aggregate="mean", score_actors=1)
    table = pa.concat_tables(raw.iter_batches(batch_size=None, batch_format="pyarrow"))
    assert table.schema.field("score").type == pa.list_(pa.float32(), 3)
    by_key = {row["key"]: row for row in table.to_pylist()}
    cross_encoder, scorer = reference("bert-3-labels-sigmoid")
    logits = cross_encoder.predict(pairs[:2], activation_fn=torch.nn.Identity())
    assert np.abs(np.array([by_key[i]["score"] for i in range(2)]) - logits).max() <= TOLERANCE
    spans = scorer.plan_windows(*pairs[2])
    windows = cross_encoder.predict([(pairs[2][0], pairs[2][1][s:e]) for s, e in spans],
                                    activation_fn=torch.nn.Identity())
    assert np.abs(np.array(by_key[2]["score"]) - windows.mean(axis=0)).max() <= TOLERANCE
    assert (by_key[2]["window_start"], by_key[2]["window_end"]) == (spans[0][0], spans[-1][1])
    # the best window of several labels is no one window: that row says so, the others are scored
    stage = ScoreStage(model, "query", "body", truncate=False, aggregate="max", activate=True, max_windows=8)
    best = stage(pa.table({"query": [q for q, _ in pairs], "body": [d for _, d in pairs]})).to_pylist()
    assert "one-label model (this one has 3 labels)" in best[2]["error"] and best[2]["score"] is None
    assert np.abs(np.array([row["score"] for row in best[:2]]) - cross_encoder.predict(pairs[:2])).max() <= TOLERANCE


def test_refusals_before_any_scoring(tmp_path, serve_cluster, folders, minilm_path):
    import ray

    model = fp32(folders, "bert-plain")
    written = tmp_path / "scored.parquet"
    pq.write_table(pa.table({"query": ["q"], "text": ["d"], "score": [0.5], "window_start": [0]}), written)
    with pytest.raises(ValueError, match=r"the input already has the columns 'score' \(the scores\), 'window_start' "
                                         r"\(the scored span\), which the scoring job writes itself"):
        run_score_job(str(written), tmp_path / "out", model, show_progress=False)
    with pytest.raises(KeyError, match=r"no column 'question'.*\(use --query-column\)"):
        run_score_job(str(written), tmp_path / "out", model, query_column="question", show_progress=False)
    assert not list((tmp_path / "out").iterdir())
    with pytest.raises(ValueError, match="'window_end'"):  # the schema is known: before anything runs
        score_dataset(ray.data.from_items([{"query": "q", "text": "d", "window_end": 3}]), model)
    embedding = ModelConfig(name="minilm", model_name=minilm_path)
    with pytest.raises(ValueError, match=r"model 'minilm' \(.*\) is of kind 'embedding': scoring pairs needs"):
        run_score_job(str(written), tmp_path / "other", embedding, show_progress=False)
    with pytest.raises(ValueError, match="aggregate must be one of"):
        run_score_job(str(written), tmp_path / "other", model, aggregate="median", show_progress=False)
    with pytest.raises(ValueError, match="max_windows must be a positive integer"):
        run_score_job(str(written), tmp_path / "other", model, max_windows=0, show_progress=False)
    check_score_columns(["query", "text", "scores", "window"])
    with pytest.raises(ValueError, match=r"'error' \(why a row has no score\)"):
        check_score_columns(["query", "text", "error"])
