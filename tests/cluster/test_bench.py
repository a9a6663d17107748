"""One smoke test of ``embedding-cluster bench --quick``: every contender runs and reports a rate; and
the pieces of the sparse rows (their SPLADE folder, their targets) and of the peers (``--peer``, their
rows against a stand-in server, their targets) on their own."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cluster.bench import (CLUSTER_ONE_TEXT, DENSE_FOR_SPARSE, LATENCY, ONE_TEXT, PEER_CHECK_TEXTS, SHORT_TEXTS,
                           SPARSE_ACTIVE_DIMS, SPARSE_HTTP, TEXTS_PER_REQUEST, Peer, PeerError, bench_peer,
                           bench_sparse_folder, check_peer, peer_row, targets)
from cluster.cli import build_parser, main
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
    for expected in ("limit: encode_folded", "naive", "sentence-transformers", "via handle", "over HTTP", "over gRPC",
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
    assert set(latency) == {"in-process forward", "http", "grpc", "handle"}
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


def test_peer_parsed():
    """``--peer NAME=URL[=MODEL]``, repeatable; without MODEL the bench model's name goes in "model" later."""
    args = build_parser().parse_args(["bench", "--peer", "infinity=http://127.0.0.1:7997/embeddings=minilm",
                                      "--peer", "tei=https://tei.example:8080/v1/embeddings"])
    assert args.peer == [Peer("infinity", "http://127.0.0.1:7997/embeddings", "minilm"),
                         Peer("tei", "https://tei.example:8080/v1/embeddings")]
    assert args.peer[0].body(["a", "b"]) == {"model": "minilm", "input": ["a", "b"]}
    assert build_parser().parse_args(["bench"]).peer == []


@pytest.mark.parametrize("value, message", [
    ("infinity", "'infinity' is not NAME=URL[=MODEL]"),
    ("a=http://h/e=m=x", "is not NAME=URL[=MODEL]"),
    ("=http://h/e", "peer name ''"),
    ("my peer=http://h/e", "peer name 'my peer'"),
    ("a=ftp://h/e", "peer a: 'ftp://h/e' is not an http(s) URL with a host"),
    ("a=http:///e", "is not an http(s) URL with a host"),
    ("a=http://h:port/e", "is not an http(s) URL with a host"),
    ("a=http://h/e=", "peer a: the MODEL after its URL is empty"),
])
def test_peer_refused(value, message, capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["bench", "--peer", value])
    error = capsys.readouterr().err
    assert exited.value.code == 2 and "argument --peer: " in error and message in error


def test_peer_targets():
    """Each peer's three targets against the cluster's rows, from made-up rows; a peer missing a row
    gets only the targets its rows give."""
    rows = [{"name": CLUSTER_ONE_TEXT, "texts_per_s": 80.0},
            {"name": "cluster over HTTP, short texts only", "texts_per_s": 300.0},
            {"name": LATENCY, "extra": {"http": {"p50_ms": 20.0, "p95_ms": 30.0}}},
            {"name": peer_row("infinity", ONE_TEXT), "texts_per_s": 100.0},
            {"name": peer_row("infinity", LATENCY), "extra": {"http": {"p50_ms": 10.0, "p95_ms": 12.0}}},
            {"name": peer_row("infinity", SHORT_TEXTS), "texts_per_s": 90.0},
            {"name": peer_row("tei", ONE_TEXT), "texts_per_s": 40.0}]
    found = {t["target"]: (t["figure"], t["goal"], t["met"]) for t in targets(rows)}
    assert found == {"one text a request, 32 clients: cluster req/s >= 1.0x peer infinity's": (0.8, ">= 1.0", False),
                     "single request p50: cluster <= peer infinity's": (2.0, "<= 1.0", False),
                     "16 texts a request: cluster >= 3x peer infinity's": (3.333, ">= 3.0", True),
                     "one text a request, 32 clients: cluster req/s >= 1.0x peer tei's": (2.0, ">= 1.0", True)}


def _stand_in_vector(text: str) -> list[float]:
    return [1.0, float(len(text)), float(text.count(" "))]


@pytest.fixture(scope="module")
def stand_in_peer():
    """A tiny OpenAI-style embeddings server (FastAPI under uvicorn, in a thread) on a port of its own:
    ``/embeddings`` answers ``_stand_in_vector`` of each text, ``/embeddings-short`` one vector too few.
    Its URL, and the bodies ``/embeddings`` got."""
    import uvicorn
    from fastapi import FastAPI

    app, bodies = FastAPI(), []

    @app.post("/embeddings")
    async def embeddings(body: dict) -> dict:
        bodies.append(body)
        return {"data": [{"embedding": _stand_in_vector(text), "index": i} for i, text in enumerate(body["input"])]}

    @app.post("/embeddings-short")
    async def embeddings_short(body: dict) -> dict:
        return {"data": [{"embedding": _stand_in_vector(text)} for text in body["input"][1:]]}

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()  # from here, connections wait in its backlog until the server accepts them
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", bodies
        server.should_exit = True
        thread.join()


TEXTS = [f"text number {i}" + " word" * (i % 5) for i in range(2 * TEXTS_PER_REQUEST)]


def test_bench_peer(stand_in_peer):
    """A peer's rows: the same texts sent by the cluster's rows' client code, checked first against the
    cluster's vectors; one text a request from 32 clients, one at a time, 16 a request."""
    url, bodies = stand_in_peer
    bodies.clear()
    reference = np.asarray([_stand_in_vector(text) for text in TEXTS[:PEER_CHECK_TEXTS]])
    peer = Peer("stand-in", f"{url}/embeddings", "stand-in-model")
    results = bench_peer(peer, TEXTS, 500, repeats=1, latency_requests=4, reference=reference)
    assert [r.name for r in results] == [peer_row("stand-in", what) for what in (ONE_TEXT, LATENCY, SHORT_TEXTS)]
    one_text, latency, short_texts = results
    for row in (one_text, short_texts):
        assert row.texts == len(TEXTS) and row.wordpieces == 500 and row.texts_per_s > 0 and not row.compare
        assert row.note == "model 'stand-in-model'; min cos to the cluster 1.0000"
    assert 0 < latency.extra["http"]["p50_ms"] <= latency.extra["http"]["p95_ms"]
    assert all(body["model"] == "stand-in-model" for body in bodies)
    # the check first; then each timed run (a warm-up and repeats=1) sends all the texts, and 4 go alone
    assert bodies[0]["input"] == TEXTS[:PEER_CHECK_TEXTS]
    sizes = Counter(len(body["input"]) for body in bodies[1:])
    assert sizes == {1: 2 * len(TEXTS) + 4, TEXTS_PER_REQUEST: 2 * len(TEXTS) // TEXTS_PER_REQUEST}
    alone = sorted(body["input"][0] for body in bodies[1:] if len(body["input"]) == 1)
    assert alone == sorted(TEXTS * 2 + TEXTS[:4])


@pytest.mark.parametrize("reference, warning", [
    (lambda vectors: -vectors, "min cos to the cluster -1.0000 < 0.99"),
    (lambda vectors: np.hstack([vectors, vectors]), "3 dims, the cluster's 6: not compared"),
])
def test_check_peer_warns(stand_in_peer, reference, warning, caplog):
    """Vectors unlike the cluster's, or of other dims, give a warning in the rows' note, not a failure."""
    url, _ = stand_in_peer
    vectors = np.asarray([_stand_in_vector(text) for text in TEXTS[:4]])
    note = check_peer(Peer("stand-in", f"{url}/embeddings", "m"), TEXTS[:4], reference(vectors))
    assert note == f"WARNING: {warning}"
    assert warning in caplog.text and "peer stand-in" in caplog.text


@pytest.mark.parametrize("path, message", [("/embeddings-short", "answered 3 vectors for 4 texts"),
                                           ("/nowhere", "answered 404")])
def test_check_peer_refuses(stand_in_peer, path, message):
    url, _ = stand_in_peer
    with pytest.raises(PeerError, match=re.escape(f"peer bad at {url}{path} {message}")):
        check_peer(Peer("bad", f"{url}{path}", "m"), TEXTS[:4])


@pytest.mark.parametrize("arguments, message", [
    (["--peer", "gone={gone}"], "embedding-cluster bench: peer gone at {gone} cannot be reached"),
    (["--peer", "a={gone}", "--peer", "a={gone}=m"], "--peer names must differ: a given twice"),
    (["--peer", "a={gone}", "--no-cluster"], "embedding-cluster bench: --peer is measured against the cluster"),
])
def test_bench_refuses_peers(arguments, message, tmp_path, capsys, free_port):
    """A peer nobody answers at, two peers of one name, peers without the cluster: exit 2 and why,
    before any model loads."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    gone = f"http://127.0.0.1:{free_port()}/embeddings"
    assert main(["bench", "--quick", "--corpus", str(corpus), *(a.format(gone=gone) for a in arguments)]) == 2
    assert message.format(gone=gone) in capsys.readouterr().err
