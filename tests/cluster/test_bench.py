"""One smoke test of ``embedding-cluster bench --quick``: every contender runs and reports a rate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_quick(tmp_path):
    report_file = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "--quick", "--json", str(report_file)],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_file.read_text())
    names = [row["name"] for row in report["results"]]
    for expected in ("limit: encode_folded", "naive", "sentence-transformers", "via handle", "over HTTP",
                     "latency", "late chunking", "cut client-side", "bulk"):
        assert any(expected in name for name in names), (expected, names)
    for row in report["results"]:
        if row["extra"]:
            assert all(f["p50_ms"] > 0 for f in row["extra"].values())
        else:
            assert row["texts_per_s"] > 0 and row["wordpieces_per_s"] > 0
    limit = report["results"][0]
    assert limit["ratio_to_limit"] == 1.0 and 0 < limit["padding_efficiency"] <= 1
    assert "contender" in result.stdout and "p50" in result.stdout
