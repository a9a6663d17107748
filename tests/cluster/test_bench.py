"""One smoke test of ``embedding-cluster bench --quick``: every contender runs and reports a rate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
                     "rerank: cluster /rerank over HTTP", "long documents in windows", "bulk"):
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
