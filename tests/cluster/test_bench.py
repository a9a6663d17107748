"""One smoke test of ``embedding-cluster bench --quick``: every contender runs and reports a rate; and
the pieces of the sparse rows (their SPLADE folder, their targets) on their own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.bench import DENSE_FOR_SPARSE, SPARSE_ACTIVE_DIMS, SPARSE_HTTP, bench_sparse_folder, targets
from deployments.settings import ModelConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.cluster
def test_bench_quick(tmp_path):
    report_file = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "--quick", "--json", str(report_file)],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_file.read_text())
    names = [row["name"] for row in report["results"]]
    for expected in ("limit: encode_folded", "naive", "sentence-transformers", "via handle", "over HTTP",
                     "latency", "late chunking", "cut client-side", "rerank: CrossEncoder.predict",
                     "rerank: cluster /rerank over HTTP", "long documents in windows", "sparse: SparseEncoder.encode",
                     SPARSE_HTTP, DENSE_FOR_SPARSE, "bulk"):
        assert any(expected in name for name in names), (expected, names)
    for row in report["results"]:
        if row["extra"]:
            assert all(f["p50_ms"] > 0 for f in row["extra"].values())
        else:
            assert row["texts_per_s"] > 0 and row["wordpieces_per_s"] > 0
    rows = {row["name"]: row for row in report["results"]}
    limit, naive = report["results"][0], next(r for r in report["results"] if r["name"].startswith("naive"))
    # length-sorted token-budget batches pad less than batches of 32 in input order
    assert naive["padding_efficiency"] < limit["padding_efficiency"] <= 1
    # the same tokens go through every path
    assert rows["cluster over HTTP, 32 concurrent clients"]["wordpieces"] == limit["wordpieces"] == naive["wordpieces"]
    for row in report["results"]:
        if "ratio_to_limit" in row and not row["short_only"]:
            assert row["ratio_to_limit"] == pytest.approx(row["wordpieces_per_s"] / limit["wordpieces_per_s"])
    assert "contender" in result.stdout and "p50" in result.stdout
    rerank = next(t for t in report["targets"] if t["target"].startswith("rerank over HTTP"))
    assert rerank["figure"] > 0 and "CrossEncoder.predict" in rerank["target"]
    # the sparse rows: the same short texts, the served model's dtype, each replica's memory sampled
    encode = next(row for name, row in rows.items() if name.startswith("sparse: SparseEncoder.encode"))
    assert encode["name"].endswith(f"({rows['limit, short texts only']['dtype']})")
    assert rows[SPARSE_HTTP]["texts"] == rows[DENSE_FOR_SPARSE]["texts"] == encode["texts"] == report["short_texts"]
    for name in (SPARSE_HTTP, DENSE_FOR_SPARSE):
        assert 0 < rows[name]["memory_mib"]["before"] <= rows[name]["memory_mib"]["peak"]
    sparse_targets = [t for t in report["targets"] if t["target"].startswith("sparse")]
    assert len(sparse_targets) == 2 and all(t["figure"] > 0 for t in sparse_targets)
    assert "encoder replica RSS" in result.stdout
    assert rows["limit, short texts only, fp32"]["dtype"] == "float32"
    latency = rows["latency, one short text"]["extra"]
    assert set(latency) == {"in-process forward", "http", "handle"}
    # where the time goes: the encoder replica is among the processes that used CPU during the HTTP run
    cores = rows["cluster over HTTP, short texts only"]["cores"]
    assert any("encoder" in name and used > 0 for name, used in cores.items()), cores
    targets = {t["target"]: t for t in report["targets"]}
    http_p50 = targets["one short text over HTTP, p50 / in-process forward p50"]
    assert http_p50["figure"] == pytest.approx(latency["http"]["p50_ms"] / latency["in-process forward"]["p50_ms"],
                                               abs=1e-3)
    assert http_p50["met"] == (http_p50["figure"] <= 2.0)
    onnx = rows.get("kernel: ONNX Runtime fp32 (exported here)")
    if onnx is not None:  # installed with '.[bench]': the exported model gives PyTorch's vectors
        assert float(onnx["note"].rsplit(" ", 1)[1]) > 0.9999


def test_bench_sparse_folder(tmp_path, minilm_path):
    """The bench's SPLADE folder loads in sentence-transformers as a SparseEncoder of the bench model's
    shape, is served as kind 'sparse', and gives about ``SPARSE_ACTIVE_DIMS`` non-zeros a text."""
    from sentence_transformers import SparseEncoder

    texts = ["The quick brown fox jumps over the lazy dog.", "Return the number of items in a container.",
             "Open the file and return a stream.", "A decimal number with a fixed precision.",
             "Run the command and wait for it to finish.", "The median of the data, the middle value."]
    model = ModelConfig(model_name=minilm_path)
    folder = bench_sparse_folder(model, tmp_path / "sparse", texts)
    encoder = SparseEncoder(folder, device="cpu")
    assert ModelConfig(name="sparse", model_name=folder).kind == "sparse"
    vectors = encoder.encode(texts).to_dense()
    assert vectors.shape == (len(texts), encoder.tokenizer.vocab_size)
    active = (vectors > 0).sum(dim=1).float()
    assert active.mean().item() == pytest.approx(SPARSE_ACTIVE_DIMS, rel=0.1)


def test_sparse_targets():
    """The sparse rows' two targets: texts/s over SparseEncoder.encode's, and the replicas' peak RSS."""
    rows = [{"name": "sparse: SparseEncoder.encode (bfloat16)", "texts_per_s": 100.0},
            {"name": SPARSE_HTTP, "texts_per_s": 150.0, "memory_mib": {"before": 700.0, "peak": 900.0}},
            {"name": DENSE_FOR_SPARSE, "texts_per_s": 400.0, "memory_mib": {"before": 500.0, "peak": 500.0}}]
    found = {t["target"]: t for t in targets(rows)}
    speed = found["sparse over HTTP / SparseEncoder.encode (bfloat16)"]
    assert (speed["figure"], speed["goal"], speed["met"]) == (1.5, ">= 1.0", True)
    memory = found["sparse replica's peak RSS / the dense model's replica's, over HTTP"]
    assert (memory["figure"], memory["goal"], memory["met"]) == (1.8, "<= 1.5", False)
