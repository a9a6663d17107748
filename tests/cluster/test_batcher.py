"""The encoder's continuous batcher: batches form when the model is free, within the token budget.

Event-driven: the stand-in model runs a batch until the test releases it, so no assertion depends
on how fast this machine is.
"""

from __future__ import annotations

import asyncio

import pytest

from deployments.batcher import ContinuousBatcher, Queued

GUARD_S = 30  # a bound against hanging, never reached when the batcher is right


class GatedModel:
    """A stand-in for the model thread: records each batch as it starts, finishes it when released."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.fail_on = fail_on
        self.batches: list[list[str]] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, batch: list[Queued[str]]) -> list[str]:
        items = [queued.item for queued in batch]
        self.batches.append(items)
        self.started.set()
        await self.release.wait()
        if self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [item.upper() for item in items]

    async def running(self, count: int) -> None:
        """Wait until ``count`` batches have started."""
        while len(self.batches) < count:
            self.started.clear()
            await self.started.wait()


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, GUARD_S))


def test_requests_that_arrive_while_a_batch_runs_form_one_batch() -> None:
    async def scenario() -> tuple[list[str], list[list[str]]]:
        model = GatedModel()
        batcher = ContinuousBatcher(model, max_weight=100, wait_s=0)
        first = asyncio.ensure_future(batcher.submit("a", 1))
        await model.running(1)  # "a" runs alone; the rest arrive while it runs
        rest = [asyncio.ensure_future(batcher.submit(item, 1)) for item in "bcdef"]
        await asyncio.sleep(0)
        model.release.set()
        return await asyncio.gather(first, *rest), model.batches

    answers, batches = run(scenario())
    assert answers == list("ABCDEF")
    assert batches == [["a"], list("bcdef")]


def test_budget_splits_batches_in_arrival_order() -> None:
    async def scenario() -> tuple[list[str], list[list[str]]]:
        model = GatedModel()
        model.release.set()
        batcher = ContinuousBatcher(model, max_weight=10, wait_s=0)
        weights = {"a": 4, "b": 4, "c": 4, "d": 30, "e": 1}
        return await asyncio.gather(*(batcher.submit(item, weight) for item, weight in weights.items())), \
            model.batches

    answers, batches = run(scenario())
    assert answers == list("ABCDE")
    # over-budget "d" runs alone; nothing is reordered
    assert batches == [["a", "b"], ["c"], ["d"], ["e"]]


def test_an_idle_model_waits_for_company_until_the_budget_fills() -> None:
    async def scenario() -> list[list[str]]:
        model = GatedModel()
        model.release.set()
        # a wait far longer than the test's guard: only a full budget can start the batch
        batcher = ContinuousBatcher(model, max_weight=100, wait_s=3600)
        waiting = [asyncio.ensure_future(batcher.submit(item, 1)) for item in "ab"]
        await asyncio.sleep(0)
        assert model.batches == []  # still waiting for company
        await asyncio.gather(*waiting, batcher.submit("c", 98))
        return model.batches

    assert run(scenario()) == [["a", "b", "c"]]


def test_an_idle_model_runs_alone_once_the_wait_is_over() -> None:
    async def scenario() -> tuple[str, list[list[str]]]:
        model = GatedModel()
        model.release.set()
        batcher = ContinuousBatcher(model, max_weight=100, wait_s=0.01)
        return await batcher.submit("a", 1), model.batches

    assert run(scenario()) == ("A", [["a"]])


def test_a_failing_request_fails_alone_and_its_batch_mates_get_their_answers() -> None:
    async def scenario() -> tuple[list, str, list[list[str]]]:
        model = GatedModel(fail_on="bad")
        model.release.set()
        batcher = ContinuousBatcher(model, max_weight=100, wait_s=0)
        answers = await asyncio.gather(*(batcher.submit(item, 1) for item in ["a", "b", "bad", "c", "d"]),
                                       return_exceptions=True)
        return answers, await batcher.submit("later", 1), model.batches

    answers, later, batches = run(scenario())
    assert answers[:2] == ["A", "B"] and answers[3:] == ["C", "D"]
    assert isinstance(answers[2], ValueError) and "bad item" in str(answers[2])
    assert later == "LATER"
    # the failed batch is halved until the culprit runs alone
    assert batches[0] == ["a", "b", "bad", "c", "d"] and ["bad"] in batches
    assert sum(batch.count("bad") for batch in batches) <= 4


def test_cancelled_callers_are_left_out_of_the_next_batch() -> None:
    async def scenario() -> tuple[list[str], list[list[str]]]:
        model = GatedModel()
        batcher = ContinuousBatcher(model, max_weight=100, wait_s=0)
        first = asyncio.ensure_future(batcher.submit("a", 1))
        await model.running(1)
        gone = asyncio.ensure_future(batcher.submit("gone", 1))
        kept = asyncio.ensure_future(batcher.submit("kept", 1))
        await asyncio.sleep(0)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        model.release.set()
        return await asyncio.gather(first, kept), model.batches

    answers, batches = run(scenario())
    assert answers == ["A", "KEPT"]
    assert batches == [["a"], ["kept"]]


def test_two_slots_run_a_second_batch_beside_the_first_and_queue_the_rest() -> None:
    async def scenario() -> tuple[list[str], list[list[str]], int]:
        model = GatedModel()
        # a wait far longer than the guard: a request that finds a batch running must not wait for company
        batcher = ContinuousBatcher(model, max_weight=2, wait_s=3600, concurrency=2)
        first = asyncio.ensure_future(batcher.submit("a", 2))  # fills the budget: no wait
        await model.running(1)
        second = asyncio.ensure_future(batcher.submit("b", 1))
        await model.running(2)  # "b" starts on the free slot while "a" still runs
        running = batcher.batches_running
        rest = [asyncio.ensure_future(batcher.submit(item, 1)) for item in "cd"]
        await asyncio.sleep(0)
        model.release.set()
        return await asyncio.gather(first, second, *rest), model.batches, running

    answers, batches, running = run(scenario())
    assert answers == list("ABCD")
    assert running == 2
    assert batches == [["a"], ["b"], ["c", "d"]]  # the queued pair waits for a free slot, then goes together


def test_what_queued_while_the_model_ran_goes_at_once_without_waiting_for_company() -> None:
    async def scenario() -> tuple[list[str], list[list[str]]]:
        model = GatedModel()
        batcher = ContinuousBatcher(model, max_weight=2, wait_s=3600)  # far past the guard
        first = asyncio.ensure_future(batcher.submit("a", 2))
        await model.running(1)
        second = asyncio.ensure_future(batcher.submit("b", 1))  # half a budget, queued behind "a"
        await asyncio.sleep(0)
        model.release.set()
        return await asyncio.gather(first, second), model.batches

    assert run(scenario()) == (["A", "B"], [["a"], ["b"]])
