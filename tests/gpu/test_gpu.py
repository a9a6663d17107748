"""The GPU tier (``make test-gpu``): run on a machine with CUDA, skipped everywhere else.

A GPU encoder replica beside CPU ones on one node, GPU dtypes against fp32 on the CPU, bit-equal
replicas, a too-long input refused without harm, a replica with a broken CUDA context replaced,
and the bench on the GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ray import serve

from cluster import EmbeddingClient
from cluster.app import build_app
from cluster.config import ClusterConfig, ModelConfig
from deployments.errors import BadRequestError
from deployments.protocol import EncodeOptions
from deployments.settings import deployment_name
from deployments.weight_store import release_weights
from embedder import PretrainedTransformerIndexer

pytestmark = [pytest.mark.gpu, pytest.mark.cluster, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REPO = Path(__file__).resolve().parents[2]
APP = "gpu-tier"
TEXTS = ["a GPU replica beside CPU replicas", "bf16 or fp16 on the card, fp32 on the CPU",
         "the same text twice gives the same bits"]


def cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def gpu_app(gpu_ray, minilm_path):
    config = ClusterConfig(app_name=APP, route_prefix=f"/{APP}", models=[
        ModelConfig(name="gpu", model_name=minilm_path, num_gpus=0.25, num_cpus=0.5,
                    autoscaling={"min_replicas": 2, "max_replicas": 2}),
        ModelConfig(name="cpu", model_name=minilm_path, dtype="float32", num_cpus=1),
    ])
    serve.run(build_app(config), name=APP, route_prefix=f"/{APP}")
    try:
        yield EmbeddingClient(app_name=APP, timeout_s=120)
    finally:
        serve.delete(APP)
        release_weights(f"{APP}/")


def _replicas(model: str, calls: int = 20) -> dict[str, dict]:
    handle = serve.get_deployment_handle(deployment_name(model), app_name=APP)
    return {i["replica"]: i for i in (handle.replica_info.remote().result(timeout_s=60) for _ in range(calls))}


def test_cpu_replicas_on_a_gpu_node_never_touch_cuda(gpu_app):
    cpu, = _replicas("cpu").values()
    assert cpu["device"] == "cpu" and cpu["cuda_initialized"] is False
    gpus = _replicas("gpu")
    assert len(gpus) == 2 and all(i["device"].startswith("cuda") and i["cuda_memory_allocated"] > 0
                                  for i in gpus.values())


def test_gpu_dtype_close_to_fp32_on_the_cpu_and_replicas_bit_equal(gpu_app):
    gpu, cpu = gpu_app.embed(TEXTS, model="gpu"), gpu_app.embed(TEXTS, model="cpu")
    assert cosine(gpu, cpu).min() >= 0.999
    card = {c["id"]: c for c in gpu_app.models()}["gpu"]
    assert card["dtype"] in ("bfloat16", "float16") and card["device"].startswith("cuda")
    assert len({i["probe_digest"] for i in _replicas("gpu").values()}) == 1  # two replicas, the same bits
    answers = [gpu_app.embed(TEXTS, model="gpu").tobytes() for _ in range(20)]
    assert len(set(answers)) == 1


def test_a_too_long_input_is_refused_and_the_replica_lives(gpu_app, minilm_path):
    handle = serve.get_deployment_handle(deployment_name("gpu"), app_name=APP)
    too_long = PretrainedTransformerIndexer(minilm_path).fold(["word " * 600])  # unfolded: 600 > 256
    with pytest.raises(BadRequestError, match="longer than model 'gpu' takes"):
        handle.encode.remote(too_long, EncodeOptions()).result(timeout_s=60)
    assert gpu_app.embed(TEXTS, model="gpu").shape == (3, 384)


def test_a_replica_whose_cuda_context_breaks_is_replaced(gpu_app, minilm_path):
    handle = serve.get_deployment_handle(deployment_name("gpu"), app_name=APP)
    before = set(_replicas("gpu"))
    poisoned = PretrainedTransformerIndexer(minilm_path).fold(["x"])
    poisoned.token_ids[:] = 10**7  # past the vocabulary: a device-side assert in the embedding lookup
    with pytest.raises(Exception):
        handle.encode.remote(poisoned, EncodeOptions()).result(timeout_s=60)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (set(_replicas("gpu")) - before):
        time.sleep(2)
    assert set(_replicas("gpu")) - before, "check_health did not get the broken replica replaced"
    assert gpu_app.embed(TEXTS, model="gpu").shape == (3, 384)


def test_bench_on_the_gpu(tmp_path, minilm_path):
    config = tmp_path / "gpu.yaml"
    config.write_text(json.dumps({"models": [{"name": "gpu", "model_name": minilm_path, "num_gpus": 1}]}))
    report = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "--quick", "--config", str(config),
                             "--json", str(report)], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(report.read_text())["results"]
    assert rows[0]["texts_per_s"] > 0 and rows[0]["note"] in ("bfloat16 on cuda", "float16 on cuda")  # on the card
