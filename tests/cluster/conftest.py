"""One real Ray instance and one Serve app for the whole session, on free ports."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from cluster.config import ClusterConfig, GRPCConfig, HTTPConfig, LimitsSettings, ModelConfig

REPO = Path(__file__).resolve().parents[2]
APP_NAME = "embeddings-test"
GUARDED_APP = "guarded"
API_KEY = "test-key-0123456789"
SCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 1,
           "downscale_delay_s": 600, "metrics_interval_s": 1, "look_back_period_s": 2}


def pytest_collection_modifyitems(items: list) -> None:
    """Tests on the session's cluster, or on a cluster ``serve`` starts, carry the ``cluster`` marker
    (``make test-fast`` leaves them out)."""
    for item in items:
        if {"serve_cluster", "start_cli_serve"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cluster)


@dataclass
class RunningCluster:
    config: ClusterConfig
    url: str


#: Texts the tiny BERT's int8/uint8 ranges are calibrated on (``calibration_corpus``).
CALIBRATION_TEXTS = [f"calibration text {i}: " + " ".join(["vectors", "search", "ranges", "bytes", "cluster",
                                                           "quantized", "documents", "meaning"][j % 8]
                                                          for j in range(i % 7 + 1)) for i in range(40)]


@pytest.fixture(scope="session")
def minilm_ranges_path(tmp_path_factory) -> str:
    """int8/uint8 ranges for MiniLM's 384 dimensions (``quantization_ranges``): made up, wide enough
    for most of its normalized vectors' values and narrow enough that some fall outside (clipped)."""
    rng = np.random.default_rng(24)
    ranges = np.stack([-rng.uniform(0.05, 0.15, 384), rng.uniform(0.05, 0.15, 384)]).astype(np.float32)
    path = tmp_path_factory.mktemp("quantization") / "minilm-ranges.npy"
    np.save(path, ranges)
    return str(path)


@pytest.fixture(scope="session")
def calibration_corpus_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("calibration") / "corpus.txt"
    path.write_text("\n".join(CALIBRATION_TEXTS) + "\n\n")
    return str(path)


@pytest.fixture(scope="session")
def cluster_config(minilm_path, tiny_bert_path, tiny_roberta_path, free_port, minilm_ranges_path,
                   calibration_corpus_path) -> ClusterConfig:
    return ClusterConfig(
        app_name=APP_NAME,
        http=HTTPConfig(port=free_port()),
        grpc=GRPCConfig(port=free_port()),
        limits=LimitsSettings(max_inputs_per_request=100, max_chars_per_input=50_000,
                              max_wordpieces_per_request=20_000),
        models=[
            # two batches at once, one torch thread each: every test of this model runs that path
            ModelConfig(name="all-MiniLM-L6-v2", model_name=minilm_path, dtype="float32", num_cpus=1,
                        concurrent_batches=2, quantization_ranges=minilm_ranges_path),
            ModelConfig(name="minilm-bf16", model_name=minilm_path, dtype="bfloat16", num_cpus=1),
            ModelConfig(name="tiny-bert", model_name=tiny_bert_path, max_length=32, num_cpus=0.5,
                        calibration_corpus=calibration_corpus_path),
            ModelConfig(name="tiny-roberta", model_name=tiny_roberta_path, max_length=64, num_cpus=0.5),
            ModelConfig(name="scale-a", model_name=minilm_path, dtype="float32", num_cpus=0.5,
                        autoscaling=SCALING),
            ModelConfig(name="scale-b", model_name=tiny_bert_path, max_length=32, num_cpus=0.25,
                        autoscaling=SCALING),
            # one-text load on it is merged into at most merge_in_flight (2) calls, under its target of 4
            ModelConfig(name="scale-merged", model_name=minilm_path, dtype="float32", num_cpus=0.05,
                        autoscaling=SCALING | {"target_ongoing_requests": 4}),
            ModelConfig(name="minilm-private", model_name=minilm_path, dtype="float32", num_cpus=0.25,
                        share_weights=False),
            ModelConfig(name="tiny-mix", model_name=tiny_bert_path, max_length=16, dtype="float32",
                        last_layer_only=False, num_cpus=0.1),
        ],
    )


@pytest.fixture(scope="session")
def guarded_config(tiny_bert_path) -> ClusterConfig:
    """A second app with an API key, a small body limit and small queues (overload and kills)."""
    return ClusterConfig(
        app_name=GUARDED_APP,
        route_prefix="/guarded",
        api_key=API_KEY,
        limits=LimitsSettings(max_body_bytes=64 * 1024, max_requests_in_flight=16),
        tokenizer={"num_cpus": 0.1},
        ingress={"num_cpus": 0.1},
        models=[ModelConfig(name="guarded-tiny", model_name=tiny_bert_path, max_length=32, num_cpus=0.25,
                            max_ongoing_requests=4, max_queued_requests=8)],
    )


@pytest.fixture(scope="session")
def serve_cluster(cluster_config, guarded_config) -> RunningCluster:
    import ray
    from ray import serve

    from cluster.app import build_app

    from cluster.front import front_environment

    # the front `serve` gives a cluster it starts (HAProxy where its binary is installed): every HTTP test runs
    # through it; EMBEDDING_CLUSTER_TEST_FRONT=proxy runs them through Serve's Python proxy instead
    with pytest.MonkeyPatch.context() as environment:
        for name, value in front_environment(os.environ.get("EMBEDDING_CLUSTER_TEST_FRONT", "auto")).items():
            environment.setenv(name, value)
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
                 namespace="embedding-cluster-tests")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": cluster_config.http.port},
                    grpc_options=cluster_config.grpc.serve_options())
        serve.run(build_app(cluster_config), name=APP_NAME, route_prefix="/")
        serve.run(build_app(guarded_config), name=GUARDED_APP, route_prefix=guarded_config.route_prefix)
        yield RunningCluster(config=cluster_config, url=f"http://127.0.0.1:{cluster_config.http.port}")
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def module_app(serve_cluster):
    """A context manager that runs an app of a test module's own on the session's cluster (its
    tokenizer and ingress on tiny CPU shares) and yields its URL; the app and its weights in the
    store go when it exits."""
    from ray import serve

    from cluster.app import build_app
    from deployments.weight_store import release_weights

    @contextlib.contextmanager
    def run(app_name: str, route_prefix: str, models: list[ModelConfig], **settings):
        config = ClusterConfig(app_name=app_name, route_prefix=route_prefix, tokenizer={"num_cpus": 0.05},
                               ingress={"num_cpus": 0.05}, models=models, **settings)
        serve.run(build_app(config), name=app_name, route_prefix=route_prefix)
        try:
            yield serve_cluster.url + route_prefix
        finally:
            serve.delete(app_name)
            release_weights(f"{app_name}/")

    return run


@pytest.fixture(scope="session")
def http(serve_cluster):
    with httpx.Client(base_url=serve_cluster.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def grpc_target(serve_cluster) -> str:
    """Where the session's gRPC (TEI's ``tei.v1``) answers; calls name their app in ``application`` metadata."""
    return f"127.0.0.1:{serve_cluster.config.grpc.port}"


@pytest.fixture(scope="session")
def guarded_url(serve_cluster, guarded_config) -> str:
    return serve_cluster.url + guarded_config.route_prefix


@pytest.fixture(scope="session")
def api_key(guarded_config) -> str:
    return guarded_config.api_key


@pytest.fixture(scope="session")
def client(serve_cluster):
    from cluster import EmbeddingClient

    return EmbeddingClient(app_name=APP_NAME)


def _start_cli_serve(config: Path, port: int, *extra_args: str, env: dict | None = None) -> subprocess.Popen:
    """``embedding-cluster serve --config CONFIG --port PORT EXTRA_ARGS`` in a subprocess, once its
    ``/health`` answers (the caller stops it; the process's output is in ``stdout``)."""
    process = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--config", str(config),
                                "--port", str(port), *extra_args], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=REPO,
                               env=(env or os.environ) | {"PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise AssertionError(f"serve exited early:\n{process.stdout.read()}")
        time.sleep(1)
    process.kill()
    raise AssertionError(f"serve did not answer /health within 180 s:\n{process.communicate()[0]}")


@pytest.fixture(scope="session")
def start_cli_serve():
    """A function that starts the CLI's ``serve`` and waits until it answers."""
    return _start_cli_serve
