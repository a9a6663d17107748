"""The weight store: one named, detached actor per cluster that keeps each model's
weights once in Ray's object store, keyed by the embedder cache's key.

An encoder asks it first: on a hit it maps the arrays (zero-copy on the same
node; one copy per node otherwise) into a model built from the config, so a
replica the autoscaler adds never reads and parses weight files again, and CPU
replicas on a node share one copy of the weights. On a miss it loads from
disk, publishes, and then maps the published copy too. Without a store (it
died, or Ray is not running) replicas load from disk, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from transformers import PreTrainedModel

from embedder.cache import ModelSpec
from embedder.shared_weights import WeightArrays, export_weights, model_from_weights

logger = logging.getLogger(__name__)

STORE_NAME = "embedding-cluster-weight-store"
STORE_NAMESPACE = "embedding-cluster"
CALL_TIMEOUT_S = 120.0


@ray.remote(num_cpus=0)
class WeightStore:
    """Holds an object reference per cache key. It puts the weights itself, so it owns
    them and they outlive the replica that published them."""

    def __init__(self) -> None:
        self._refs: dict[str, ray.ObjectRef] = {}

    def get(self, key: str) -> list[ray.ObjectRef]:
        """``[ref]`` on a hit (in a list, so that Ray hands over the reference, not the arrays), else ``[]``."""
        ref = self._refs.get(key)
        return [ref] if ref is not None else []

    def publish(self, key: str, weights: WeightArrays) -> list[ray.ObjectRef]:
        """Keep ``weights`` under ``key`` unless another replica was first; the stored reference."""
        if key not in self._refs:
            self._refs[key] = ray.put(weights)
        return [self._refs[key]]

    def keys(self) -> list[str]:
        return sorted(self._refs)


def store_key(spec: ModelSpec) -> str:
    """The store's key: the embedder cache key, spelled out (every field that changes the weights)."""
    return repr(spec)


def weight_store() -> ray.actor.ActorHandle:
    """The cluster's store, created by whoever asks first (and again if it died)."""
    return WeightStore.options(name=STORE_NAME, namespace=STORE_NAMESPACE, lifetime="detached",
                               get_if_exists=True).remote()


def kill_weight_store() -> None:
    """Drop the store and the weights it holds (the CLI does this when it stops its app)."""
    try:
        ray.kill(ray.get_actor(STORE_NAME, namespace=STORE_NAMESPACE))
    except ValueError:
        pass


def _shared(weights: WeightArrays, spec: ModelSpec) -> PreTrainedModel:
    if weights.spec != spec:
        raise ValueError(f"the store answered {weights.spec} for {spec}")
    return model_from_weights(weights)


def load_shared(spec: ModelSpec, load: Callable[[], PreTrainedModel]) -> tuple[PreTrainedModel, str]:
    """The model of ``spec`` and where its weights came from: ``"store"`` (mapped from the
    object store), ``"disk"`` (loaded, published, then mapped) or ``"disk, no store"``."""
    key = store_key(spec)
    try:
        store = weight_store()
        found = ray.get(store.get.remote(key), timeout=CALL_TIMEOUT_S)
        if found:
            return _shared(ray.get(found[0], timeout=CALL_TIMEOUT_S), spec), "store"
    except (RayActorError, GetTimeoutError, ValueError) as error:
        logger.warning("weight store unusable for %s (%s); loading from disk", spec.model_name, error)
        return load(), "disk, no store"
    model = load()
    try:
        published = ray.get(store.publish.remote(key, export_weights(spec, model)), timeout=CALL_TIMEOUT_S)
        return _shared(ray.get(published[0], timeout=CALL_TIMEOUT_S), spec), "disk"
    except (RayActorError, GetTimeoutError, ValueError) as error:
        logger.warning("could not share the weights of %s (%s)", spec.model_name, error)
        return model, "disk, no store"
