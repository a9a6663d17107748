"""Readiness, a model that cannot load, request ids, timing headers, server faults and client timeouts."""

from __future__ import annotations

import logging
import shutil

import httpx
import pytest
from ray import serve
from starlette.requests import Request

from cluster import EmbeddingClient
from cluster.app import build_app
from cluster.cli import deploy_failure
from cluster.config import ClusterConfig, ModelConfig
from deployments.http_errors import server_error
from deployments.weight_store import release_weights

BROKEN_APP = "broken"


def test_ready_when_every_model_runs(http, cluster_config):
    response = http.get("/ready")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "models": sorted(m.name for m in cluster_config.models)}


def test_a_model_that_cannot_load_fails_its_deployment_with_one_line_and_is_not_ready(
        serve_cluster, tmp_path, tiny_bert_path):
    folder = tmp_path / "broken-model"
    shutil.copytree(tiny_bert_path, folder)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    config = ClusterConfig(app_name=BROKEN_APP, route_prefix=f"/{BROKEN_APP}", tokenizer={"num_cpus": 0.05},
                           ingress={"num_cpus": 0.05},
                           models=[ModelConfig(name="broken", model_name=str(folder), num_cpus=0.05)])
    try:
        with pytest.raises(RuntimeError) as failure:
            serve.run(build_app(config), name=BROKEN_APP, route_prefix=f"/{BROKEN_APP}")
        line = deploy_failure(BROKEN_APP, failure.value)
        assert line.startswith(f"model 'broken' ({folder}) could not be loaded: ")
        assert "\n" not in line and "Traceback" not in line
        with httpx.Client(base_url=f"{serve_cluster.url}/{BROKEN_APP}", timeout=60) as http:
            assert http.get("/health").status_code == 200  # alive
            ready = http.get("/ready")
            assert ready.status_code == 503 and ready.headers["retry-after"] == "1"
            message = ready.json()["error"]["message"]
            assert message.startswith("not ready: broken (") and "could not be loaded" in message
    finally:
        serve.delete(BROKEN_APP)
        release_weights(f"{BROKEN_APP}/")


def test_request_ids_and_timing_headers(http):
    mine = http.post("/embed", json={"inputs": ["a request with its own id"]}, headers={"X-Request-Id": "abc-123"})
    assert mine.status_code == 200 and mine.headers["x-request-id"] == "abc-123"
    timings = {name: float(mine.headers[f"x-{name}-time"]) for name in ("total", "tokenization", "queue",
                                                                         "inference")}
    assert all(value >= 0 for value in timings.values())
    assert timings["inference"] > 0 and timings["total"] >= timings["inference"]
    generated = http.post("/embed", json={"inputs": ["no id given"]})
    assert len(generated.headers["x-request-id"]) >= 16 and generated.headers["x-request-id"] != "abc-123"
    bad = http.post("/embed", json={"inputs": [""]}, headers={"X-Request-Id": "bad-456"})
    assert bad.status_code == 400 and bad.headers["x-request-id"] == "bad-456"
    assert bad.json()["error"]["request_id"] == "bad-456"
    unknown = http.post("/embed", json={"inputs": "x", "model": "nope"}, headers={"X-Request-Id": "nf-789"})
    assert unknown.json()["error"]["request_id"] == "nf-789"
    for route in ("/embed_tokens", "/embed_chunks", "/v1/embeddings"):
        body = {"input": "timed"} if route.startswith("/v1") else {"inputs": "timed"}
        assert "x-inference-time" in http.post(route, json=body).headers, route


async def _receive() -> dict:
    return {"type": "http.request", "body": b""}


def test_a_server_fault_is_logged_once_with_its_traceback_and_id(caplog):
    request = Request({"type": "http", "method": "POST", "path": "/embed", "headers": [(b"x-request-id", b"req-1")],
                       "query_string": b"", "server": ("127.0.0.1", 80), "scheme": "http", "root_path": ""},
                      _receive)
    try:
        raise KeyError("a bug")
    except KeyError as error:
        fault = error
    import asyncio

    with caplog.at_level(logging.ERROR, logger="deployments.http_errors"):
        response = asyncio.run(server_error(request, fault))
    assert response.status_code == 500
    assert b"req-1" in response.body and b"Traceback" not in response.body and b"a bug" not in response.body
    records = [r for r in caplog.records if r.name == "deployments.http_errors"]
    assert len(records) == 1 and "req-1" in records[0].getMessage() and records[0].exc_info[1] is fault


def test_client_timeout(serve_cluster, cluster_config):
    client = EmbeddingClient(app_name=cluster_config.app_name, timeout_s=0.001)
    with pytest.raises(TimeoutError, match="within 0.001 s"):
        client.embed(["a long text to keep the encoder busy " * 100] * 50)
    patient = EmbeddingClient(app_name=cluster_config.app_name, timeout_s=120)
    assert patient.embed(["answered in time"]).shape == (1, 384)
