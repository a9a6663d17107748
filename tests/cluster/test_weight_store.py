"""The weight store's identity and lifecycle: retrained weights are a new key, one replica loads while
the others wait, keys nobody holds are dropped, released users free their weights."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
import ray
import torch
from ray import serve
from transformers import AutoModel, AutoTokenizer

from cluster.app import build_app
from cluster.config import ClusterConfig, ModelConfig
from deployments.settings import deployment_name
from deployments.weight_store import STORE_NAME, STORE_NAMESPACE, WeightStore, release_weights
from st_folders import save_bert

APP = "retrain"
TEXTS = ["weights change when a model is retrained", "the store must not keep the old ones"]


def cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def plain_mean(folder: str) -> np.ndarray:
    """Mean pooling of the plain transformers model: what a plain folder is served as."""
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return ((hidden * mask).sum(1) / mask.sum(1)).numpy()


def deploy(folder: str, replicas: int = 1) -> None:
    config = ClusterConfig(
        app_name=APP, route_prefix=f"/{APP}", tokenizer={"num_cpus": 0.05}, ingress={"num_cpus": 0.05},
        models=[ModelConfig(name="m", model_name=folder, max_length=32, dtype="float32", num_cpus=0.05,
                            autoscaling={"min_replicas": replicas, "max_replicas": replicas})])
    serve.run(build_app(config), name=APP, route_prefix=f"/{APP}")


def store():
    return ray.get_actor(STORE_NAME, namespace=STORE_NAMESPACE)


def test_retrained_weights_are_served_after_redeploy_and_old_ones_dropped(serve_cluster, tmp_path, minilm_path):
    folder = tmp_path / "model"
    save_bert(folder, minilm_path, seed=1)
    deploy(str(folder), replicas=3)
    try:
        with httpx.Client(base_url=f"{serve_cluster.url}/{APP}", timeout=120) as http:
            before = np.array(http.post("/embed", json={"inputs": TEXTS}).json())
            assert cosine(before, plain_mean(str(folder))).min() >= 0.99999
            handle = serve.get_deployment_handle(deployment_name("m"), app_name=APP)
            infos = {i["replica"]: i for i in (handle.replica_info.remote().result(timeout_s=60) for _ in range(30))}
            # three replicas started together: one read the files, the others waited for its copy
            assert sorted(i["weights_source"] for i in infos.values()) == ["disk", "store", "store"]
            user = f"{APP}/{deployment_name('m')}"
            old_key = ray.get(store().holders.remote())[user]
            save_bert(folder, minilm_path, seed=2)  # retrained into the same folder
            serve.delete(APP)
            deploy(str(folder))
            after = np.array(http.post("/embed", json={"inputs": TEXTS}).json())
        assert cosine(after, plain_mean(str(folder))).min() >= 0.99999
        assert cosine(after, before).max() < 0.99
        new_key = ray.get(store().holders.remote())[user]
        keys = ray.get(store().keys.remote())
        assert new_key != old_key and new_key in keys and old_key not in keys
    finally:
        serve.delete(APP)
        release_weights(f"{APP}/")
    assert not any(u.startswith(f"{APP}/") for u in ray.get(store().holders.remote()))
    assert new_key not in ray.get(store().keys.remote())


@pytest.fixture
def fresh_store(serve_cluster):
    actor = WeightStore.remote()
    yield actor
    ray.kill(actor)


def test_one_user_loads_while_the_others_wait(fresh_store):
    assert ray.get(fresh_store.acquire.remote("k", "app/a", 30)) == []  # a loads
    waiting = fresh_store.acquire.remote("k", "app/b", 30)
    ready, _ = ray.wait([waiting], timeout=0.5)
    assert not ready, "b should wait for a's copy, not load the files too"
    ref = ray.put(np.arange(4))
    ray.get(fresh_store.publish.remote("k", [ref]))
    found = ray.get(waiting, timeout=30)
    assert len(found) == 1 and ray.get(found[0]).tolist() == [0, 1, 2, 3]
    # a loader that fails lets the next one load instead of waiting out the bound
    assert ray.get(fresh_store.acquire.remote("k2", "app/a", 30)) == []
    waiting = fresh_store.acquire.remote("k2", "app/c", 30)
    fresh_store.abandon.remote("k2")
    assert ray.get(waiting, timeout=30) == []
    # and the bound holds when nobody publishes
    assert ray.get(fresh_store.acquire.remote("k3", "app/d", 30)) == []
    assert asyncio.run(_timed(fresh_store.acquire.remote("k3", "app/e", 0.5))) == []


async def _timed(ref):
    return await ref


def test_keys_live_while_someone_holds_them(fresh_store):
    for user, key in [("one/a", "k1"), ("one/b", "k1"), ("two/a", "k2")]:
        ray.get(fresh_store.acquire.remote(key, user, 1))
        ray.get(fresh_store.publish.remote(key, [ray.put(key)]))
    assert ray.get(fresh_store.release.remote("one/a")) == 2  # one/b still holds k1
    assert ray.get(fresh_store.keys.remote()) == ["k1", "k2"]
    ray.get(fresh_store.acquire.remote("k3", "one/b", 1))  # one/b redeployed onto new weights
    ray.get(fresh_store.publish.remote("k3", [ray.put("k3")]))
    assert ray.get(fresh_store.keys.remote()) == ["k2", "k3"]
    assert ray.get(fresh_store.release.remote("one/")) == 1
    assert ray.get(fresh_store.release.remote("two/")) == 0
