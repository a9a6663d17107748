"""``GET /ready`` needs no key and is not counted in flight: its answer is computed at most once a
second, however often it is asked (without Ray: the controller's answer is counted)."""

from __future__ import annotations

import asyncio

import pytest

from deployments import pipeline
from deployments.pipeline import EmbeddingPipeline
from deployments.settings import IngressSettings, ServingSettings


def test_readiness_is_computed_once_a_second(monkeypatch):
    service = EmbeddingPipeline(ServingSettings(ingress=IngressSettings(inline_tokenize_max_chars=0)),
                                tokenizer=None, encoders={})
    calls = []

    def statuses() -> dict:
        calls.append(1)
        return {}

    monkeypatch.setattr(service, "_deployment_statuses", statuses)

    async def probes(count: int) -> list:
        together = await asyncio.gather(*(service.not_ready() for _ in range(count)))
        return together + [await service.not_ready() for _ in range(count)]

    answers = asyncio.run(probes(50))
    assert len(calls) == 1
    assert all(answer == {"all-MiniLM-L6-v2": "no deployment"} for answer in answers)
    monkeypatch.setattr(pipeline, "READY_TTL_S", 0.0)
    asyncio.run(probes(1))
    assert len(calls) == 3  # an answer past its time is computed again


def test_a_model_no_replica_can_answer_is_refused_at_once(monkeypatch):
    """A request for a model whose replicas wait for resources the cluster lacks gets a 503 naming why,
    at once, instead of waiting until it times out; a model still starting is waited for."""
    from deployments.errors import OverloadedError

    service = EmbeddingPipeline(ServingSettings(ingress=IngressSettings(inline_tokenize_max_chars=0)),
                                tokenizer=None, encoders={})
    unplaced = ("Deployment 'encoder-x' has 1 replicas that have taken more than 30s to be scheduled. Resources "
                "required for each replica: {'CPU': 1.0}, total resources available: {'CPU': 0.25}.")
    status = {"status": "UPDATING", "status_message": unplaced, "replicas": {"starting": 1}}
    monkeypatch.setattr(service, "_deployment_statuses", lambda: {"all-MiniLM-L6-v2": status})
    sent = []

    async def call():
        sent.append(1)
        return None

    with pytest.raises(OverloadedError, match=r"no replica to answer it: UPDATING: .* to be scheduled"):
        asyncio.run(service._call_model("all-MiniLM-L6-v2", "embed", call, cost=1))
    assert not sent
    starting = {"status": "UPDATING", "status_message": "", "replicas": {"starting": 1}}
    monkeypatch.setattr(service, "_deployment_statuses", lambda: {"all-MiniLM-L6-v2": starting})
    monkeypatch.setattr(pipeline, "READY_TTL_S", 0.0)
    service._readiness = None

    class Answer:
        timings: dict = {}

    async def answer():
        sent.append(1)
        return Answer()

    asyncio.run(service._call_model("all-MiniLM-L6-v2", "embed", answer, cost=1))
    assert sent == [1]
