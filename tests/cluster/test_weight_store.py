"""The weight store's identity and lifecycle: retrained weights are a new key, one replica loads while
the others wait (and a loader that fails lets them go at once), keys nobody holds are dropped, released
users free their weights, and replicas Serve stops release their own hold, whichever CLI deleted the app."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import numpy as np
import pytest
import ray
import torch
from ray import serve
from transformers import AutoModel, AutoTokenizer, BertModel

from cluster.app import build_app
from cluster.config import ClusterConfig, ModelConfig
from deployments.loading import load_encoder
from deployments.settings import deployment_name
from deployments.weight_store import (STORE_NAME, STORE_NAMESPACE, WeightStore, load_shared, release_weights,
                                      store_key, weight_store)
from embedder.cache import ModelSpec
from st_folders import save_bert

APP = "retrain"
TEXTS = ["weights change when a model is retrained", "the store must not keep the old ones"]


def cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def plain_mean(folder: str) -> np.ndarray:
    """Mean pooling of the plain transformers model: what a plain folder is served as."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return ((hidden * mask).sum(1) / mask.sum(1)).numpy()


def deploy(folder: str, replicas: int = 1, app: str = APP) -> None:
    config = ClusterConfig(
        app_name=app, route_prefix=f"/{app}", tokenizer={"num_cpus": 0.05}, ingress={"num_cpus": 0.05},
        models=[ModelConfig(name="m", model_name=folder, max_length=32, dtype="float32", num_cpus=0.05,
                            autoscaling={"min_replicas": replicas, "max_replicas": replicas})])
    serve.run(build_app(config), name=app, route_prefix=f"/{app}")


def store():
    return ray.get_actor(STORE_NAME, namespace=STORE_NAMESPACE)


def holders(prefix: str) -> dict[str, str]:
    """The store's users named ``prefix...`` and the key each holds."""
    return {u: k for u, k in ray.get(store().holders.remote()).items() if u.startswith(prefix)}


def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Poll ``condition`` until it holds (Serve reports an app deleted a moment before its replicas' ends)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def ray_instance(free_port):
    """Ray with Serve: the session cluster's when it runs, else a small instance of this module's own
    (these tests need no served models but their own)."""
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 namespace="embedding-cluster-tests")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        yield
    finally:
        if started:
            serve.shutdown()
            ray.shutdown()


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
            replicas = holders(f"{APP}/{deployment_name('m')}/")  # each replica holds the key as itself
            assert len(replicas) == 3 and len(set(replicas.values())) == 1
            old_key = next(iter(replicas.values()))
            save_bert(folder, minilm_path, seed=2)  # retrained into the same folder
            serve.delete(APP)
            # Serve stopped the replicas: they released their holds themselves (no release_weights yet)
            wait_for(lambda: not holders(f"{APP}/"))
            assert old_key not in ray.get(store().keys.remote())
            deploy(str(folder))
            after = np.array(http.post("/embed", json={"inputs": TEXTS}).json())
        assert cosine(after, plain_mean(str(folder))).min() >= 0.99999
        assert cosine(after, before).max() < 0.99
        (new_key,) = holders(f"{APP}/").values()
        keys = ray.get(store().keys.remote())
        assert new_key != old_key and new_key in keys and old_key not in keys
    finally:
        serve.delete(APP)
        release_weights(f"{APP}/")
    assert not any(u.startswith(f"{APP}/") for u in ray.get(store().holders.remote()))
    assert new_key not in ray.get(store().keys.remote())


@pytest.fixture
def fresh_store(ray_instance):
    actor = WeightStore.remote()
    yield actor
    ray.kill(actor)


@pytest.mark.cluster
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


@pytest.mark.cluster
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


@pytest.mark.cluster
def test_replicas_hold_as_themselves_and_move_as_their_deployment(fresh_store):
    assert ray.get(fresh_store.acquire.remote("k1", "app/enc/r1", 1, "app/enc")) == []
    ray.get(fresh_store.publish.remote("k1", [ray.put("k1")]))
    assert len(ray.get(fresh_store.acquire.remote("k1", "app/enc/r2", 1, "app/enc"))) == 1
    ray.get(fresh_store.acquire.remote("k1", "other/enc/x", 1, "other/enc"))  # another app, same weights
    assert ray.get(fresh_store.release_user.remote("app/enc/r1")) == 1  # scale-down: r2 still serves k1
    assert ray.get(fresh_store.keys.remote()) == ["k1"]
    assert ray.get(fresh_store.release_user.remote("app/enc/r")) == 1  # exact names, not prefixes
    ray.get(fresh_store.acquire.remote("k2", "app/enc/r3", 1, "app/enc"))  # redeployed onto new weights
    ray.get(fresh_store.publish.remote("k2", [ray.put("k2")]))
    # r2 (the old version, or a replica that crashed without releasing) no longer holds k1 for app/enc
    assert ray.get(fresh_store.holders.remote()) == {"other/enc/x": "k1", "app/enc/r3": "k2"}
    assert ray.get(fresh_store.release_user.remote("other/enc/x")) == 1
    assert ray.get(fresh_store.keys.remote()) == ["k2"]
    # weights published for a key whose users were all released meanwhile are not kept
    assert ray.get(fresh_store.acquire.remote("k3", "app/enc/r4", 1, "app/enc")) == []
    ray.get(fresh_store.release_user.remote("app/enc/r4"))
    own = ray.put("k3")
    (returned,) = ray.get(fresh_store.publish.remote("k3", [own]))
    assert ray.get(returned) == "k3" and "k3" not in ray.get(fresh_store.keys.remote())
    assert ray.get(fresh_store.release.remote("app/")) == 0


@pytest.mark.cluster
def test_a_loader_that_fails_to_publish_lets_the_waiting_replicas_load_at_once(ray_instance, tiny_bert_path):
    spec = ModelSpec.create(tiny_bert_path, attn_implementation="eager")  # a key of this test's own
    key, wait_s = store_key(spec), 60.0
    waiting = []

    def load() -> BertModel:
        # a second replica asks while this one loads: it waits for this one's copy
        waiting.append(weight_store().acquire.remote(key, "abandon-test/enc/b", wait_s, "abandon-test/enc"))
        assert not ray.wait(waiting, timeout=0.5)[0]
        # float8 has no numpy dtype: export_weights fails (a TypeError, none of Ray's errors)
        return BertModel.from_pretrained(tiny_bert_path).to(torch.float8_e4m3fn)

    try:
        started = time.monotonic()
        model, source = load_shared(spec, load, "abandon-test/enc/a", "abandon-test/enc", wait_s=wait_s)
        assert source == "disk, no store" and next(model.parameters()).dtype == torch.float8_e4m3fn
        assert ray.get(waiting[0], timeout=wait_s) == []  # b is now the one to load, without waiting out wait_s
        assert time.monotonic() - started < wait_s / 4
    finally:
        weight_store().abandon.remote(key)  # b never loads
        ray.get(weight_store().release.remote("abandon-test/"))


def test_the_serving_path_loads_the_configured_dtype(fp16_bert):
    """A float16 checkpoint served as configured (``ModelConfig.dtype``), float32 matching plain transformers."""
    encoder, _ = load_encoder(ModelConfig(name="m", model_name=fp16_bert, dtype="float32", device="cpu",
                                          share_weights=False))
    assert encoder.embedder.dtype == torch.float32
    assert cosine(encoder.encode(TEXTS), plain_mean(fp16_bert)).min() >= 0.99999
    encoder, _ = load_encoder(ModelConfig(name="m", model_name=fp16_bert, dtype="bfloat16", device="cpu",
                                          share_weights=False))
    assert encoder.embedder.dtype == torch.bfloat16


@pytest.mark.cluster
def test_replicas_release_their_weights_when_serve_stops_them(ray_instance, tmp_path, minilm_path):
    """No ``release_weights``: what ``serve delete`` / ``serve deploy`` (Ray's CLI) leave behind."""
    app, folder = "release-on-stop", tmp_path / "model"
    save_bert(folder, minilm_path, seed=3)
    prefix = f"{app}/{deployment_name('m')}/"
    try:
        deploy(str(folder), replicas=2, app=app)
        replicas = holders(prefix)  # two users, one per replica (one stopping releases only its own hold)
        assert len(replicas) == 2 and len(set(replicas.values())) == 1
        key = next(iter(replicas.values()))
        assert key in ray.get(store().keys.remote())
        serve.delete(app)
        wait_for(lambda: not holders(f"{app}/"))
        assert key not in ray.get(store().keys.remote())
    finally:
        serve.delete(app)
        ray.get(store().release.remote(f"{app}/"))
