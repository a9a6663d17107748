"""The encoder's continuous batcher: batches form when the model is free, within the token budget."""

from __future__ import annotations

import asyncio

import pytest

from deployments.batcher import ContinuousBatcher, Queued


class RecordingModel:
    """A stand-in for the model thread: records each batch, takes ``seconds`` per batch."""

    def __init__(self, seconds: float = 0.05, fail_on: str | None = None) -> None:
        self.seconds = seconds
        self.fail_on = fail_on
        self.batches: list[list[str]] = []

    async def __call__(self, batch: list[Queued[str]]) -> list[str]:
        items = [queued.item for queued in batch]
        self.batches.append(items)
        await asyncio.sleep(self.seconds)
        if self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [item.upper() for item in items]


def test_requests_that_arrive_while_a_batch_runs_form_one_batch() -> None:
    model = RecordingModel(seconds=0.1)

    async def run() -> list[str]:
        batcher = ContinuousBatcher(model, max_weight=100, wait_s=0)
        first = asyncio.ensure_future(batcher.submit("a", 1))
        await asyncio.sleep(0.02)  # "a" runs alone; the rest arrive one by one while it runs
        rest = []
        for item in "bcdef":
            rest.append(asyncio.ensure_future(batcher.submit(item, 1)))
            await asyncio.sleep(0.01)
        return await asyncio.gather(first, *rest)

    assert asyncio.run(run()) == list("ABCDEF")
    assert model.batches == [["a"], list("bcdef")]


def test_budget_splits_batches_in_arrival_order() -> None:
    model = RecordingModel(seconds=0.01)

    async def run() -> list[str]:
        batcher = ContinuousBatcher(model, max_weight=10, wait_s=0.05)
        weights = {"a": 4, "b": 4, "c": 4, "d": 30, "e": 1}
        return await asyncio.gather(*(batcher.submit(item, weight) for item, weight in weights.items()))

    assert asyncio.run(run()) == list("ABCDE")
    # over-budget "d" runs alone; nothing is reordered
    assert model.batches == [["a", "b"], ["c"], ["d"], ["e"]]


def test_an_idle_model_waits_for_company_only_up_to_the_wait() -> None:
    model = RecordingModel(seconds=0.01)

    async def run() -> float:
        batcher = ContinuousBatcher(model, max_weight=100, wait_s=1.0)
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = asyncio.ensure_future(batcher.submit("a", 1))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(batcher.submit("b", 1))
        await asyncio.gather(first, second)
        elapsed = loop.time() - started
        await batcher.submit("c", 100)  # a full budget does not wait
        return elapsed, loop.time() - started - elapsed

    waited, full = asyncio.run(run())
    assert model.batches == [["a", "b"], ["c"]]
    assert 1.0 <= waited < 1.5
    assert full < 0.5


def test_a_failing_batch_fails_its_callers_and_the_next_batch_runs() -> None:
    model = RecordingModel(seconds=0.05, fail_on="bad")

    async def run() -> tuple[list, str]:
        batcher = ContinuousBatcher(model, max_weight=100, wait_s=0.02)
        failed = await asyncio.gather(batcher.submit("ok", 1), batcher.submit("bad", 1), return_exceptions=True)
        return failed, await batcher.submit("later", 1)

    failed, later = asyncio.run(run())
    assert all(isinstance(error, ValueError) and "bad item" in str(error) for error in failed)
    assert later == "LATER"


def test_cancelled_callers_are_left_out_of_the_next_batch() -> None:
    model = RecordingModel(seconds=0.1)

    async def run() -> list[str]:
        batcher = ContinuousBatcher(model, max_weight=100, wait_s=0)
        first = asyncio.ensure_future(batcher.submit("a", 1))
        await asyncio.sleep(0.02)
        gone = asyncio.ensure_future(batcher.submit("gone", 1))
        kept = asyncio.ensure_future(batcher.submit("kept", 1))
        await asyncio.sleep(0.01)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        return await asyncio.gather(first, kept)

    assert asyncio.run(run()) == ["A", "KEPT"]
    assert model.batches == [["a"], ["kept"]]
