"""The encoder deployment: one per served model, batching its requests across clients.

What depends on the kind of model (embedding, reranker, classifier) is its head
(``deployments.model_heads``); batching, threads, health and metrics are here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
import torch
from ray import serve

from deployments.autoscaling import REQUESTS_HELD
from deployments.batcher import ContinuousBatcher, Queued
from deployments.errors import BadRequestError, ModelLoadError
from deployments.loading import concurrent_batches, release_replica_weights, replica_device
from deployments.metrics import EncoderMetrics
from deployments.model_heads import HEADS, EmbeddingHead, EncodeItem, PairScoreHead, SparseHead
from deployments.protocol import EncodeOptions, EncodeResult, ScoreRequest, ScoreResult, SparseRequest, SparseResult
from deployments.settings import ModelConfig
from deployments.weight_store import weight_bytes
from embedder.folded_batch import FoldedBatch
from embedder.inference import EncodeStats

logger = logging.getLogger(__name__)

#: A replica whose last batch succeeded this recently is healthy without a probe (no probe waits in a busy queue).
HEALTHY_IF_ANSWERED_WITHIN_S = 10.0
#: How long the health probe's one-text forward may take (Serve's own health check timeout is 30 s).
HEALTH_PROBE_TIMEOUT_S = 20.0


def batch_allowance_s(tokens: int, seconds_per_token: float, floor_s: float, factor: float) -> float:
    """How long a batch of ``tokens`` may run before its forward counts as hung: ``factor`` times
    what its tokens take at the slowest rate this replica has seen, and never less than ``floor_s``."""
    return max(floor_s, factor * tokens * seconds_per_token)


@serve.deployment(name="encoder")
class Encoder:
    """Runs one model through the head of its kind. Requests are batched continuously
    (``deployments.batcher``) up to ``max_batch_tokens`` tokens; each batch runs (length-sorted
    sub-batches) on a worker thread so that the replica keeps accepting requests while the
    model runs."""

    #: A running batch fails the health check past ``batch_allowance_s(tokens, ..., floor, factor)``.
    hung_batch_floor_s = 60.0
    hung_batch_factor = 20.0

    def __init__(self, model: ModelConfig) -> None:
        started = time.monotonic()
        self._config = model
        # Torch runs only on the batch threads, loading and warm-up included: every thread that
        # calls torch gets its own OpenMP team, and an idle team slows the busy ones (one short
        # text on 2 cores: 6-8 ms on one thread, 14 ms once another thread had run the model).
        self._batches = concurrent_batches(model, replica_device(model))
        self._executor = ThreadPoolExecutor(max_workers=self._batches, thread_name_prefix=f"encode-{model.name}")
        threads = max(1, model.cpu_threads // self._batches)
        try:
            self._head: EmbeddingHead | PairScoreHead | SparseHead = self._executor.submit(HEADS[model.kind], model,
                                                                              threads).result()
        except Exception as error:
            logger.exception("model %s (%s) could not be loaded", model.name, model.model_name)
            raise ModelLoadError(f"model {model.name!r} ({model.model_name}) could not be loaded: "
                                 f"{type(error).__name__}: {error}") from None
        self._device = self._head.device
        self._metrics = EncoderMetrics(model.name)
        #: requests inside this replica, merged ones each on its own: what the autoscaler counts
        self._requests_held = 0
        self._batcher: ContinuousBatcher[Any, Any] = ContinuousBatcher(
            self._run_batch, model.max_batch_tokens, model.batch_wait_timeout_s, concurrency=self._batches)
        #: the running batches' start times and tokens, and the slowest seconds per token seen
        self._running: dict[int, tuple[float, int]] = {}
        warm_up_started = time.monotonic()
        self._probe_digest = self._executor.submit(self._warm_up).result()
        self._last_success = time.monotonic()
        self._seconds_per_token = (self._last_success - warm_up_started) / self._head.probe.weight
        self._ready_seconds = time.monotonic() - started
        logger.info("%s %s ready on %s (%s, %d batches at once, %d torch threads each) in %.2f s, weights "
                    "from %s", self._head.kind, model.name, self._device, self._head.dtype, self._batches, threads,
                    self._ready_seconds, self._head.weights_source)

    def _warm_up(self) -> str:
        """Run the model once; the digest of its answer tells replicas' weights apart."""
        return self._head.probe_digest(self._head.run([self._head.probe], EncodeStats())[0])

    def __del__(self) -> None:
        """Serve calls this when it stops the replica gracefully (scale-down, redeploy, ``serve.delete``,
        Ray's ``serve`` CLI as well as ours): release this replica's hold on its weights in the store, so
        that weights no replica serves any more leave the object store. Once only (Python may call it again)."""
        if "_config" in self.__dict__ and not self.__dict__.get("_weights_released"):
            self._weights_released = True
            release_replica_weights(self._config)

    def replica_info(self) -> dict:
        """This replica: where its weights came from, how long it took to be ready, its process, and
        whether it touched CUDA at all (a CPU replica on a GPU node must not)."""
        weights, weights_in_shared_memory = weight_bytes(self._head.weights)
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "weights_source": self._head.weights_source,
            "weight_bytes": weights,
            "weight_bytes_in_shared_memory": weights_in_shared_memory,
            "ready_seconds": self._ready_seconds,
            "concurrent_batches": self._batches,
            "torch_threads_per_batch": self._executor.submit(torch.get_num_threads).result(),
            "probe_digest": self._probe_digest,
            "device": str(self._device),
            "cuda_initialized": torch.cuda.is_initialized(),
            "cuda_memory_allocated": torch.cuda.memory_allocated() if torch.cuda.is_initialized() else 0,
        }

    def info(self) -> dict:
        """What ``GET /models`` shows about this model: its head's settings, dtype and device."""
        return {**self._head.info(), "dtype": str(self._head.dtype).removeprefix("torch."),
                "device": str(self._device)}

    async def check_health(self) -> None:
        """Serve calls this every few seconds; raising gets the replica replaced. Unhealthy when a
        running batch has run far longer than its tokens warrant (``batch_allowance_s``: a hung
        forward). Healthy when a batch succeeded lately or one is running (a long request must not
        get its replica killed: a broken model fails the batch at once, and the next check probes),
        else when a one-text forward (through the batcher, bounded) answers finite vectors: a replica
        whose model cannot run any more (e.g. a CUDA context broken by a device-side assert) fails it."""
        now = time.monotonic()
        for started, tokens in list(self._running.values()):
            allowed = batch_allowance_s(tokens, self._seconds_per_token, self.hung_batch_floor_s,
                                        self.hung_batch_factor)
            if now - started > allowed:
                raise RuntimeError(f"model {self._config.name!r}: a batch of {tokens} tokens has run for "
                                   f"{now - started:.1f} s, over the {allowed:.1f} s its size warrants: its "
                                   "forward pass is hung")
        if self._batcher.batches_running or now - self._last_success < HEALTHY_IF_ANSWERED_WITHIN_S:
            return
        probe = self._head.probe
        result = await asyncio.wait_for(self._batcher.submit(probe, weight=probe.weight),
                                        timeout=HEALTH_PROBE_TIMEOUT_S)
        self._head.probe_digest(result)

    def _check_kind(self, kinds: tuple[str, ...], call: str) -> None:
        if self._head.kind not in kinds:
            raise BadRequestError(f"model {self._config.name!r} is a {self._head.kind} model; {call} needs "
                                  f"{' or '.join(kinds)} models")

    async def encode(self, batch: FoldedBatch, options: EncodeOptions) -> EncodeResult:
        """Encode one request's folded inputs (batched with other requests)."""
        self._check_kind(("embedding",), "embedding")
        item = EncodeItem(batch, options)
        self._head.validate(item)
        self._requests_held += 1
        try:
            return await self._batcher.submit(item, weight=item.weight)
        finally:
            self._requests_held -= 1

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metric (``deployments.autoscaling``): the requests this replica holds."""
        return {REQUESTS_HELD: float(self._requests_held)}

    async def encode_merged(self, batches: list[FoldedBatch], options: EncodeOptions) -> list[EncodeResult | Exception]:
        """``encode`` for several requests the ingress merged into one call: each its own batch item,
        answered with its own result or its own exception (one bad request fails only itself)."""
        return await asyncio.gather(*(self.encode(batch, options) for batch in batches), return_exceptions=True)

    async def score(self, request: ScoreRequest) -> ScoreResult:
        """Score one request's pairs or texts (their segments batched with other requests')."""
        self._check_kind(("reranker", "classifier"), "scoring")
        item = await asyncio.to_thread(self._head.plan, request)
        output = await self._batcher.submit(item, weight=item.weight)
        scores = self._head.scorer.finish(item.plan, output.logits, activate=request.activate,
                                          apply_softmax=request.apply_softmax, aggregate=request.aggregate)
        return ScoreResult(scores=scores, num_tokens=item.plan.num_tokens, timings=output.timings)

    async def embed_sparse(self, request: SparseRequest) -> SparseResult:
        """Sparse vectors of one request's texts (batched with other requests')."""
        self._check_kind(("sparse",), "sparse embedding")
        item = await asyncio.to_thread(self._head.plan, request)
        if isinstance(item, SparseResult):
            result = item
        else:
            output = await self._batcher.submit(item, weight=item.weight)
            result = SparseResult(rows=output.rows, num_wordpieces=item.batch.num_wordpieces, timings=output.timings)
        if request.return_tokens:
            result.tokens = [self._head.model.tokenizer.convert_ids_to_tokens(indices.tolist())
                             for indices, _ in result.rows]
        return result

    async def _run_batch(self, queued: list[Queued]) -> list:
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        tokens = sum(entry.weight for entry in queued)
        key = id(queued)
        self._running[key] = (started, tokens)
        try:
            results = await loop.run_in_executor(self._executor, self._run_items, [e.item for e in queued])
        finally:
            del self._running[key]
        self._last_success = time.monotonic()
        self._seconds_per_token = max(self._seconds_per_token, (self._last_success - started) / max(tokens, 1))
        inference_ms = 1000 * (self._last_success - started)
        self._metrics.batch_latency.observe(inference_ms, tags=self._metrics.tags)
        for entry, result in zip(queued, results):
            queue_ms = 1000 * (started - entry.enqueued)
            self._metrics.queue_wait.observe(queue_ms, tags=self._metrics.tags)
            result.timings = {"queue_ms": queue_ms, "inference_ms": inference_ms}
            if entry.item.tokenize_ms is not None:
                result.timings["tokenization_ms"] = entry.item.tokenize_ms
        return results

    def _run_items(self, items: list) -> list:
        """Run a batch of requests through the head (on a batch thread)."""
        stats = EncodeStats()
        results = self._head.run(items, stats)
        self._metrics.batch_tokens.observe(stats.real_tokens, tags=self._metrics.tags)
        self._metrics.padding_efficiency.set(stats.padding_efficiency, tags=self._metrics.tags)
        return results
