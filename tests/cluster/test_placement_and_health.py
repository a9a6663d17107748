"""What the GPU path gets right that a CPU can check: placement by Ray's allotment, batch budgets,
dtypes across replicas, length guards, deterministic pooling, and the encoder's health check."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import numpy as np
import pytest
import torch

from cluster.config import ModelConfig
from deployments.encoder import Encoder
from deployments.errors import BadRequestError
from deployments.loading import concurrent_batches, placement
from deployments.pipeline import replica_placements
from deployments.protocol import EncodeOptions
from embedder import PretrainedTransformerEmbedder, PretrainedTransformerIndexer, encode_folded, pool_ragged


@pytest.mark.parametrize("device, gpu_ids, cuda, expected", [
    ("auto", [], True, "cpu"),       # a CPU replica on a GPU node: Ray gave it no GPU, it must not use one
    ("auto", [0], True, "cuda"),     # a replica with num_gpus
    ("auto", [0], False, "cpu"),     # Ray's GPU without a CUDA build of torch
    ("auto", None, True, "cuda"),    # outside Ray (the library): the GPU this process sees
    ("auto", None, False, "cpu"),
    ("cpu", [0], True, "cpu"),       # an explicit device wins
])
def test_placement_follows_what_ray_gave_the_replica(device, gpu_ids, cuda, expected):
    assert placement(device, gpu_ids, cuda) == torch.device(expected)


@pytest.mark.parametrize("settings, device, expected", [
    ({"num_cpus": 1}, "cpu", 1),                             # one torch thread: one batch at a time
    ({"num_cpus": 2}, "cpu", 2),                             # two threads: two batches, one thread each
    ({"num_cpus": 8}, "cpu", 2),                             # more threads are split between two batches
    ({"torch_threads": 4, "concurrent_batches": 4}, "cpu", 4),
    ({"num_cpus": 1, "concurrent_batches": 3}, "cpu", 3),    # as asked (one thread each)
    ({"num_cpus": 2, "num_gpus": 1, "concurrent_batches": 2}, "cuda", 1),  # a GPU runs one batch at a time
])
def test_concurrent_batches(settings, device, expected):
    assert concurrent_batches(ModelConfig(**settings), torch.device(device)) == expected


def test_batch_budget_defaults_by_device():
    assert ModelConfig().max_batch_tokens == 8192
    assert ModelConfig(num_gpus=1).max_batch_tokens == 65536
    assert ModelConfig(num_gpus=0.5, max_batch_tokens=20000).max_batch_tokens == 20000


def test_replicas_with_different_dtypes_show_as_mixed():
    same = replica_placements([{"dtype": "bfloat16", "device": "cuda"}] * 3)
    assert same == {"dtype": "bfloat16", "dtypes": ["bfloat16"], "device": "cuda", "devices": ["cuda"]}
    mixed = replica_placements([{"dtype": "bfloat16", "device": "cuda"}, {"dtype": "float16", "device": "cuda"}])
    assert (mixed["dtype"], mixed["dtypes"]) == ("mixed", ["bfloat16", "float16"])


def test_a_segment_past_the_positions_is_refused_before_the_forward(tiny_bert_path):
    embedder = PretrainedTransformerEmbedder(tiny_bert_path, train_parameters=False)  # 128 positions, no folding
    batch = PretrainedTransformerIndexer(tiny_bert_path).fold(["word " * 200])
    with pytest.raises(ValueError, match="longer than the 128 positions"):
        encode_folded(embedder, batch)
    assert encode_folded(embedder, PretrainedTransformerIndexer(tiny_bert_path).fold(["short"])).shape == (1, 32)


def test_pooling_does_not_depend_on_batch_mates():
    torch.manual_seed(0)
    mine = torch.randn(7, 16)
    alone = pool_ragged(mine, torch.tensor([7]), ("mean", "max", "weightedmean"))
    others = torch.randn(40, 16)
    together = pool_ragged(torch.cat([others[:25], mine, others[25:]]), torch.tensor([25, 7, 15]),
                           ("mean", "max", "weightedmean"))
    assert torch.equal(together[1], alone[0])


@pytest.fixture
def encoder(minilm_path):
    """The encoder deployment's class, in this process (one per test: its batcher belongs to the event
    loop of the test's ``asyncio.run``)."""
    return Encoder.func_or_class(ModelConfig(name="minilm", model_name=minilm_path, dtype="float32").resolved())


def test_health_check_runs_a_forward_and_fails_when_the_model_cannot(encoder):
    async def scenario() -> None:
        await encoder.check_health()  # answered lately: healthy without a probe
        encoder._last_success -= 100
        await encoder.check_health()  # a probe forward answered
        forward = encoder._head.weights.forward
        encoder._head.weights.forward = _broken
        encoder._last_success -= 100
        try:
            with pytest.raises(RuntimeError, match="device-side assert"):
                await encoder.check_health()
        finally:
            encoder._head.weights.forward = forward
        await encoder.check_health()

    asyncio.run(scenario())


@contextlib.contextmanager
def gated_forward(encoder):
    """The encoder's forward pass waits until the test sets ``release`` (``entered`` is set once a
    batch is in it): a batch that runs as long as the test wants, in the real model."""
    forward, entered, release = encoder._head.weights.forward, threading.Event(), threading.Event()

    def gated(*args, **kwargs):
        entered.set()
        release.wait(60)
        return forward(*args, **kwargs)

    encoder._head.weights.forward = gated
    try:
        yield entered, release
    finally:
        release.set()
        encoder._head.weights.forward = forward


def test_a_long_batch_keeps_its_replica_healthy(encoder, minilm_path):
    """A health check during a batch that runs long must not queue a probe behind it (three probes
    timing out would get Serve to kill the replica mid-request)."""
    async def scenario(entered: threading.Event, release: threading.Event) -> np.ndarray:
        running = asyncio.ensure_future(encoder.encode(PretrainedTransformerIndexer(minilm_path).fold(["long"]),
                                                       EncodeOptions()))
        await asyncio.to_thread(entered.wait, 60)
        encoder._last_success -= 100
        try:
            await asyncio.wait_for(encoder.check_health(), timeout=5)
        finally:
            release.set()
        return (await running).vectors

    with gated_forward(encoder) as (entered, release):
        assert asyncio.run(scenario(entered, release)).shape == (1, 384)


def test_a_hung_forward_fails_the_health_check(encoder, minilm_path):
    """A batch that runs far past what its tokens warrant gets its replica replaced: here the
    allowance is set to nothing, so the gated forward counts as hung at once."""
    async def scenario(entered: threading.Event, release: threading.Event) -> np.ndarray:
        running = asyncio.ensure_future(encoder.encode(PretrainedTransformerIndexer(minilm_path).fold(["stuck"]),
                                                       EncodeOptions()))
        await asyncio.to_thread(entered.wait, 60)
        try:
            await encoder.check_health()  # within the default allowance (a minute at least)
            encoder.hung_batch_floor_s, encoder.hung_batch_factor = 0.0, 0.0
            with pytest.raises(RuntimeError, match="a batch of \\d+ tokens has run for .* forward pass is hung"):
                await encoder.check_health()
        finally:
            release.set()
        return (await running).vectors

    with gated_forward(encoder) as (entered, release):
        assert asyncio.run(scenario(entered, release)).shape == (1, 384)


def _broken(*args, **kwargs):
    raise RuntimeError("CUDA error: device-side assert triggered")


def test_a_too_long_segment_is_refused_and_the_replica_keeps_answering(encoder, minilm_path):
    indexer = PretrainedTransformerIndexer(minilm_path)  # no folding: one 600-wordpiece segment
    too_long = indexer.fold(["word " * 600])

    async def scenario() -> np.ndarray:
        with pytest.raises(BadRequestError, match="longer than model 'minilm' takes \\(256\\)"):
            await encoder.encode(too_long, EncodeOptions())
        return (await encoder.encode(indexer.fold(["fine"]), EncodeOptions())).vectors

    assert asyncio.run(scenario()).shape == (1, 384)
