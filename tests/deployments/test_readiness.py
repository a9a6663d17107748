"""``GET /ready`` needs no key and is not counted in flight: its answer is computed at most once a
second, however often it is asked (without Ray: the controller's answer is counted)."""

from __future__ import annotations

import asyncio

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
