"""Per-model autoscaling, and the weight store shared by replicas (memory, exactness, keys)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

import psutil
import pytest
import ray
import torch
from ray import serve

from deployments.settings import deployment_name
from deployments.loading import load_indexer
from deployments.weight_store import STORE_NAME, STORE_NAMESPACE
from embedder import PretrainedTransformerEmbedder
from embedder.inference import encode_folded

logger = logging.getLogger(__name__)
APP = "embeddings-test"
MINILM_FP32_BYTES = 22_713_216 * 4  # parameters of all-MiniLM-L6-v2 in float32


def _running(status, model: str) -> int:
    return status.applications[APP].deployments[deployment_name(model)].replica_states.get("RUNNING", 0)


def _replicas(model: str, calls: int = 40) -> dict[str, dict]:
    """Every replica's ``replica_info`` (calls spread over the replicas by Serve's router)."""
    handle = serve.get_deployment_handle(deployment_name(model), app_name=APP)
    infos = [handle.replica_info.remote().result(timeout_s=60) for _ in range(calls)]
    return {info["replica"]: info for info in infos}


LOAD = ["a sentence that keeps the scaled model busy for a little while " * 8] * 16


@pytest.fixture(scope="module")
def scaled(client, http):
    """Load on scale-a only, until Serve runs two of its replicas."""
    texts = LOAD

    async def load(until: float) -> None:
        async def one() -> None:
            while time.monotonic() < until and _running(serve.status(), "scale-a") < 2:
                await client.aembed(texts, model="scale-a")

        await asyncio.gather(*(one() for _ in range(6)))

    started = time.monotonic()
    asyncio.run(load(started + 120))
    seconds = time.monotonic() - started
    deadline = time.monotonic() + 60
    while _running(serve.status(), "scale-a") < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    logger.warning("scale-a reached %d replicas after %.1f s of load", _running(serve.status(), "scale-a"), seconds)
    return seconds


def test_load_on_one_model_scales_only_its_encoders(scaled, http):
    status = serve.status()
    assert _running(status, "scale-a") == 2
    assert _running(status, "scale-b") == 1
    cards = {card["id"]: card for card in http.get("/models").json()["data"]}
    assert cards["scale-a"]["replicas"]["running"] == 2
    assert cards["scale-b"]["replicas"] == {"running": 1}


def test_added_replica_takes_the_store_weights_and_answers_identically(scaled, minilm_path):
    infos = _replicas("scale-a")
    assert len(infos) == 2
    sources = sorted(info["weights_source"] for info in infos.values())
    assert "store" in sources, sources
    for info in infos.values():
        logger.warning("scale-a replica: weights from %s, ready in %.2f s", info["weights_source"],
                       info["ready_seconds"])
    reference = _reference_digest(minilm_path, "float32")
    assert {info["probe_digest"] for info in infos.values()} == {reference}
    private, = _replicas("minilm-private", calls=3).values()
    logger.warning("minilm-private replica (share_weights off): ready in %.2f s", private["ready_seconds"])
    assert private["weights_source"] == "disk" and private["probe_digest"] == reference


def test_two_keys_never_mix(serve_cluster, minilm_path):
    store = ray.get_actor(STORE_NAME, namespace=STORE_NAMESPACE)
    keys = ray.get(store.keys.remote())
    assert any("dtype='float32'" in k for k in keys) and any("dtype='bfloat16'" in k for k in keys)
    bf16, = _replicas("minilm-bf16", calls=3).values()
    assert bf16["probe_digest"] == _reference_digest(minilm_path, "bfloat16")
    assert bf16["probe_digest"] != _reference_digest(minilm_path, "float32")


def test_a_store_fed_replica_maps_the_stores_copy_and_holds_no_weights_of_its_own(scaled):
    """Every weight tensor of a store-fed replica lies in the object store's shared mapping; the
    replica that does not share holds them all in private memory. (Comparing two processes' USS
    instead drowns 87 MiB of weights in what their allocators keep from past batches.)"""
    infos = _replicas("scale-a").values()
    private, = _replicas("minilm-private", calls=3).values()
    for info in [*infos, private]:
        logger.warning("%s replica: %.0f MiB of weights, %.0f MiB of them in shared memory (USS %.0f MiB)",
                       info["weights_source"], info["weight_bytes"] / 2**20,
                       info["weight_bytes_in_shared_memory"] / 2**20,
                       psutil.Process(info["pid"]).memory_full_info().uss / 2**20)
    for info in infos:
        assert info["weight_bytes"] >= MINILM_FP32_BYTES
        assert info["weight_bytes_in_shared_memory"] == info["weight_bytes"], info
    assert private["weight_bytes"] >= MINILM_FP32_BYTES
    assert private["weight_bytes_in_shared_memory"] == 0


def _reference_digest(minilm_path: str, dtype: str) -> str:
    """What the encoder's warm-up answers, computed here from the files (one thread, as in the replicas)."""
    from embedder.cache import clear_cache
    from deployments.model_heads import WARM_UP_TEXT
    from cluster.config import ModelConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        clear_cache()
        embedder = PretrainedTransformerEmbedder(minilm_path, transformer_kwargs={"dtype": getattr(torch, dtype)},
                                                 train_parameters=False)
        batch = load_indexer(ModelConfig(model_name=minilm_path)).fold([WARM_UP_TEXT])
        vectors = encode_folded(embedder, batch, normalize=True)[0]  # MiniLM's Normalize module
    finally:
        torch.set_num_threads(threads)
        clear_cache()
    return hashlib.sha256(vectors.tobytes()).hexdigest()[:16]


def test_batch_threads_follow_the_config(serve_cluster):
    """``concurrent_batches`` reaches the replica: that many batch threads, the model's torch threads
    split among them (what torch itself reports on a batch thread)."""
    two, = _replicas("all-MiniLM-L6-v2", calls=3).values()  # num_cpus 1, concurrent_batches 2
    one, = _replicas("minilm-private", calls=3).values()  # num_cpus 0.25: one torch thread, one batch
    assert (two["concurrent_batches"], two["torch_threads_per_batch"]) == (2, 1)
    assert (one["concurrent_batches"], one["torch_threads_per_batch"]) == (1, 1)
