"""The weight store: one named, detached actor per cluster that keeps each model's
weights once in Ray's object store, keyed by the embedder cache's key and the
weight files' fingerprint (so retrained weights in the same folder are a new key).

An encoder asks it first: on a hit it maps the arrays (zero-copy on the same
node; one copy per node otherwise) into a model built from the config, so a
replica the autoscaler adds never reads and parses weight files again, and CPU
replicas on a node share one copy of the weights. On a miss the first replica
loads from disk and publishes while the others wait for it (bounded), so replicas
starting together read the files once. Every user (an encoder replica, or a bulk
job) holds one key: when a redeployed model moves to another key, or a user is
released, keys nobody holds are dropped. A replica releases its own hold when Serve
stops it (``Encoder.__del__``: scale-down, redeploy, ``serve delete``, ``serve
shutdown``); the replicas of one deployment form a group that moves to a new key
together, so a replica that ended without releasing (a crash) holds no old weights
once its deployment moved on. ``release_weights`` releases a whole app at once.
Without a store (it died, or Ray is not running) replicas load from disk, with a
warning.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError
from transformers import PreTrainedModel

from embedder.cache import ModelSpec
from embedder.shared_weights import export_weights, model_from_weights
from embedder.weights import weights_fingerprint

logger = logging.getLogger(__name__)

STORE_NAME = "embedding-cluster-weight-store"
STORE_NAMESPACE = "embedding-cluster"
CALL_TIMEOUT_S = 120.0
#: How long a replica waits for another one that is loading the same weights, before loading them itself.
LOAD_WAIT_S = 300.0
#: How long a stopping replica waits for the store to take its release (Serve's graceful shutdown allows 20 s).
RELEASE_TIMEOUT_S = 5.0


@ray.remote(num_cpus=0)
class WeightStore:
    """Holds an object reference per key, and which user holds which key. The weights are put
    with the store as their owner, so they outlive the replica that published them."""

    def __init__(self) -> None:
        self._refs: dict[str, ray.ObjectRef] = {}
        self._loading: dict[str, asyncio.Event] = {}
        self._held: dict[str, str] = {}  # user -> key
        self._groups: dict[str, str] = {}  # user -> its group (the deployment, for a replica)

    async def acquire(self, key: str, user: str, wait_s: float, group: str | None = None) -> list[ray.ObjectRef]:
        """``user`` now holds ``key`` (its earlier key is dropped if nobody else holds it); so does
        its ``group``: the group's other users holding another key are released (replicas of the
        deployment's earlier version, or ended without releasing).
        ``[ref]`` when the weights are here (in a list, so that Ray hands over the reference, not
        the arrays), after waiting up to ``wait_s`` for another user loading them; ``[]`` when the
        caller is to load them (it then calls ``publish``, or ``abandon`` if it fails)."""
        moved = [] if group is None else [u for u, g in self._groups.items()
                                          if g == group and u != user and self._held.get(u) != key]
        previous = self._held.get(user)
        self._held[user] = key
        if group is not None:
            self._groups[user] = group
        for other in moved:
            self._forget(other)
        if previous is not None and previous != key:
            self._drop_unheld(previous)
        if key not in self._refs and key in self._loading:
            try:
                await asyncio.wait_for(self._loading[key].wait(), timeout=wait_s)
            except asyncio.TimeoutError:
                return []
        if key in self._refs:
            return [self._refs[key]]
        self._loading[key] = asyncio.Event()
        return []

    async def publish(self, key: str, refs: list[ray.ObjectRef]) -> list[ray.ObjectRef]:
        """Keep a copy of ``refs[0]``, owned by the store, under ``key`` unless another user was first;
        the stored reference. (The publisher's own object goes when it drops it: Ray 2.56 removed
        ``ray.put(_owner=...)``, so the store must copy to own the weights.) A key nobody holds any
        more (its users were released while it loaded) is not kept: the publisher gets its own back."""
        if key not in self._refs and key in self._held.values():
            self._refs[key] = ray.put(await refs[0])
        self._wake(key)
        return [self._refs.get(key, refs[0])]

    async def abandon(self, key: str) -> None:
        """The user loading ``key`` failed: let the waiting ones load it themselves."""
        self._wake(key)

    async def release(self, prefix: str) -> int:
        """Forget every user whose name starts with ``prefix`` and drop the keys nobody holds now;
        the number of keys left."""
        for user in [u for u in self._held if u.startswith(prefix)]:
            self._forget(user)
        return len(self._refs)

    async def release_user(self, user: str) -> int:
        """Forget ``user`` (exactly that name) and drop its key if nobody holds it now; the number of
        keys left."""
        self._forget(user)
        return len(self._refs)

    async def keys(self) -> list[str]:
        return sorted(self._refs)

    async def holders(self) -> dict[str, str]:
        return dict(self._held)

    def _wake(self, key: str) -> None:
        event = self._loading.pop(key, None)
        if event is not None:
            event.set()

    def _forget(self, user: str) -> None:
        self._groups.pop(user, None)
        key = self._held.pop(user, None)
        if key is not None:
            self._drop_unheld(key)

    def _drop_unheld(self, key: str) -> None:
        if key not in self._held.values():
            self._refs.pop(key, None)


def store_key(spec: ModelSpec) -> str:
    """The store's key: the embedder cache key spelled out (every field that changes the weights),
    and the fingerprint of the files the weights come from."""
    return f"{spec!r}#{weights_fingerprint(spec.model_name, spec.override_weights_file)}"


def weight_store() -> ray.actor.ActorHandle:
    """The cluster's store, created by whoever asks first (and again if it died)."""
    return WeightStore.options(name=STORE_NAME, namespace=STORE_NAMESPACE, lifetime="detached",
                               get_if_exists=True).remote()


def release_weights(prefix: str) -> None:
    """Release the users named ``prefix...`` (an app's deployments, a bulk job); remove the store
    when nobody holds any weights any more."""
    try:
        store = ray.get_actor(STORE_NAME, namespace=STORE_NAMESPACE)
    except ValueError:
        return
    try:
        if ray.get(store.release.remote(prefix), timeout=CALL_TIMEOUT_S) == 0:
            ray.kill(store)
    except (RayActorError, GetTimeoutError) as error:
        logger.warning("could not release the weights of %s (%s)", prefix, error)


def release_user(user: str) -> None:
    """Release the one user ``user`` (a stopping replica), waiting at most ``RELEASE_TIMEOUT_S``.
    The store stays even when empty: other replicas may be starting and about to use it. Waits with
    ``ray.wait``, which, unlike ``ray.get``, does not warn in an async actor (a Serve replica)."""
    try:
        store = ray.get_actor(STORE_NAME, namespace=STORE_NAMESPACE)
    except ValueError:
        return
    done, _ = ray.wait([store.release_user.remote(user)], timeout=RELEASE_TIMEOUT_S)
    if not done:
        logger.warning("the weight store did not answer the release of %s within %.0f s", user, RELEASE_TIMEOUT_S)


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """Bytes of ``model``'s weight tensors (each storage once): all of them, and those that lie in
    shared memory mappings of this process (the object store's), read from ``/proc/self/maps``.
    Tells a replica that maps the store's copy from one holding a private copy, whatever else
    its allocator keeps. Linux only: elsewhere the second number is 0."""
    shared_ranges = []
    maps = Path("/proc/self/maps")
    if maps.exists():
        for line in maps.read_text().splitlines():
            addresses, permissions = line.split()[:2]
            if permissions.endswith("s"):
                start, end = (int(a, 16) for a in addresses.split("-"))
                shared_ranges.append((start, end))
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    total = sum(storages.values())
    shared = sum(size for pointer, size in storages.items()
                 if any(start <= pointer and pointer + size <= end for start, end in shared_ranges))
    return total, shared


def _shared(ref: ray.ObjectRef, spec: ModelSpec) -> PreTrainedModel:
    weights = ray.get(ref, timeout=CALL_TIMEOUT_S)
    if weights.spec != spec:
        raise ValueError(f"the store answered {weights.spec} for {spec}")
    model = model_from_weights(weights)
    model.shared_weights_ref = ref  # borrowed: the arrays stay alive even once the store drops the key
    return model


def load_shared(spec: ModelSpec, load: Callable[[], PreTrainedModel], user: str, group: str | None = None,
                wait_s: float = LOAD_WAIT_S) -> tuple[PreTrainedModel, str]:
    """The model of ``spec`` and where its weights came from: ``"store"`` (mapped from the
    object store), ``"disk"`` (loaded, published, then mapped) or ``"disk, no store"``.
    ``user`` names who holds the weights (an encoder replica, a bulk job), ``group`` the users
    that move to new weights together (a replica's deployment). Once this process is the one to
    load, any failure abandons the key, so that the others waiting (up to ``wait_s``) load at once:
    a failure to share falls back to the loaded model, anything else is raised."""
    key = store_key(spec)
    try:
        store = weight_store()
        found = ray.get(store.acquire.remote(key, user, wait_s, group), timeout=wait_s + CALL_TIMEOUT_S)
        if found:
            return _shared(found[0], spec), "store"
    except (RayActorError, GetTimeoutError, ValueError) as error:
        logger.warning("weight store unusable for %s (%s); loading from disk", spec.model_name, error)
        return load(), "disk, no store"
    try:
        model = load()
    except BaseException:
        store.abandon.remote(key)
        raise
    try:
        own = ray.put(export_weights(spec, model))
        published = ray.get(store.publish.remote(key, [own]), timeout=CALL_TIMEOUT_S)
        del own  # the store's copy is the one kept: only one copy stays in the object store
        return _shared(published[0], spec), "disk"
    except BaseException as error:
        store.abandon.remote(key)
        if not isinstance(error, Exception):
            raise
        logger.warning("could not share the weights of %s (%s: %s); using the copy loaded from disk",
                       spec.model_name, type(error).__name__, error)
        return model, "disk, no store"
