"""Continuous request batching for the encoder: a batch is formed when the model is free.

``@serve.batch`` forms the next batch as soon as the previous one is handed
over, not when it finishes: while the model runs, requests are cut into
``batch_wait_timeout_s`` windows that then run one small batch after another
(measured in-process on the bench corpus: one 16-text request per forward
pass runs at about half the texts/s of eight such requests per pass). Here a
batch takes everything queued when the model frees up, up to a token budget,
so batches grow with the load; only an idle model waits
(``batch_wait_timeout_s``) for company. Up to ``concurrency`` batches run at
once (a CPU replica's worker threads, one torch thread each).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class Queued(Generic[Item]):
    """A request waiting for a batch: its item, its weight (tokens), its answer, and whether it
    found no batch running (only such a request waits for company)."""

    item: Item
    weight: int
    future: asyncio.Future
    found_idle: bool = False
    enqueued: float = field(default_factory=time.monotonic)


class ContinuousBatcher(Generic[Item, Result]):
    """Runs ``run_batch`` on batches of at most ``max_weight`` (a single heavier item runs
    alone), at most ``concurrency`` batches at a time, first come first served."""

    def __init__(self, run_batch: Callable[[list[Queued[Item]]], Awaitable[list[Result]]],
                 max_weight: int, wait_s: float, concurrency: int = 1) -> None:
        self._run_batch = run_batch
        self._max_weight = max_weight
        self._wait_s = wait_s
        self._queue: deque[Queued[Item]] = deque()
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._free_slots = asyncio.Semaphore(concurrency)
        self._running: set[asyncio.Task] = set()

    @property
    def batches_running(self) -> int:
        """How many batches run now."""
        return len(self._running)

    async def submit(self, item: Item, weight: int) -> Result:
        """Queue ``item`` and wait for its result (or the exception its batch raised)."""
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work())
        queued = Queued(item, weight, asyncio.get_running_loop().create_future(), found_idle=not self._running)
        self._queue.append(queued)
        self._arrived.set()
        return await queued.future

    async def _work(self) -> None:
        while True:
            await self._free_slots.acquire()  # a batch is taken only when it can start: it holds all that queued
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            if self._wait_s and self._queue[0].found_idle:
                await self._wait_for_company()
            batch = self._take_batch()
            if not batch:
                self._free_slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        self._free_slots.release()

    def _weight_queued(self) -> int:
        return sum(queued.weight for queued in self._queue)

    async def _wait_for_company(self) -> None:
        """The model is idle: wait up to ``wait_s`` for the batch to fill."""
        deadline = time.monotonic() + self._wait_s
        while self._weight_queued() < self._max_weight and (remaining := deadline - time.monotonic()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:  # an alias of TimeoutError since Python 3.11 (requires-python)
                return

    def _take_batch(self) -> list[Queued[Item]]:
        """The oldest requests whose callers still wait, up to the budget."""
        batch: list[Queued[Item]] = []
        weight = 0
        while self._queue:
            head = self._queue[0]
            if head.future.done():  # the caller went away (cancelled)
                self._queue.popleft()
                continue
            if batch and weight + head.weight > self._max_weight:
                break
            batch.append(self._queue.popleft())
            weight += head.weight
        return batch

    async def _run(self, batch: list[Queued[Item]]) -> None:
        """Run a batch and answer its callers. When it fails, each half runs again on its own, down
        to single requests: only the request that causes the failure gets it, its batch mates
        their results (a failure that every request meets costs a batch per request)."""
        try:
            results = await self._run_batch(batch)
        except Exception as error:
            waiting = [queued for queued in batch if not queued.future.done()]
            if len(waiting) <= 1:
                for queued in waiting:
                    queued.future.set_exception(error)
                return
            middle = len(waiting) // 2
            await self._run(waiting[:middle])
            await self._run(waiting[middle:])
            return
        for queued, result in zip(batch, results):
            if not queued.future.done():
                queued.future.set_result(result)
