"""``CallCoalescer``: concurrent small requests for one model merged into one deployment call.

Every handle call costs the ingress and the encoder replica a few milliseconds of CPU (routing,
serialization, the replica's request bookkeeping) whatever it carries: on one text a request that
is most of its cost. So each lane (a model and the options its requests share) keeps at most
``max_in_flight`` calls in flight: a request that finds a free slot goes at once, alone; those that
arrive while every slot is busy wait, and ride together in the next call as soon as one returns.
An idle cluster adds no wait, a busy one sends one call for many requests.

Each merged request keeps its own outcome: the deployment answers one result or one exception per
request (``Encoder.encode_merged``), a failed call fails each of its requests on its own (each may
retry it, alone), and a request cancelled while it waits leaves the call; cancelled after it left,
the call still answers the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

#: Sends one call for the items of several requests; answers one result or exception per item.
SendMerged = Callable[[list[Any]], Awaitable[list[Any]]]


@dataclass
class _Lane:
    """One model and options: its calls in flight and the requests waiting for a slot."""

    key: Hashable
    send: SendMerged
    in_flight: int = 0
    waiting: list[tuple[Any, asyncio.Future]] = field(default_factory=list)


class CallCoalescer:
    """Merges the requests of a lane that arrive while its ``max_in_flight`` calls are out into one
    call of at most ``max_merged`` requests (see the module)."""

    def __init__(self, max_in_flight: int, max_merged: int) -> None:
        if max_in_flight < 1 or max_merged < 1:
            raise ValueError(f"max_in_flight and max_merged must be positive, not {max_in_flight}, {max_merged}")
        self._max_in_flight = max_in_flight
        self._max_merged = max_merged
        self._lanes: dict[Hashable, _Lane] = {}
        #: requests sent, and calls that carried them (what merging saved)
        self.requests = 0
        self.calls = 0

    def waiting(self, key: Hashable) -> int:
        """Requests of a lane that wait for a slot."""
        lane = self._lanes.get(key)
        return 0 if lane is None else len(lane.waiting)

    async def submit(self, key: Hashable, item: Any, send: SendMerged) -> Any:
        """``item``'s own answer (or exception), sent alone or merged with the lane's other requests;
        ``send`` makes the lane's calls (the first request's ``send`` for a new lane)."""
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(key, send)
        future = asyncio.get_running_loop().create_future()
        lane.waiting.append((item, future))
        if lane.in_flight < self._max_in_flight:
            self._launch(lane)
        return await future

    def _launch(self, lane: _Lane) -> None:
        """Send up to ``max_merged`` of the lane's waiting requests (those still wanted) in one call."""
        entries = [(item, future) for item, future in lane.waiting[:self._max_merged] if not future.done()]
        del lane.waiting[:self._max_merged]
        if not entries:
            if lane.waiting:
                self._launch(lane)
            elif not lane.in_flight:
                self._retire(lane)
            return
        lane.in_flight += 1
        self.requests += len(entries)
        self.calls += 1
        asyncio.get_running_loop().create_task(self._call(lane, entries))

    async def _call(self, lane: _Lane, entries: list[tuple[Any, asyncio.Future]]) -> None:
        try:
            results = await lane.send([item for item, _ in entries])
            if len(results) != len(entries):
                raise RuntimeError(f"a merged call of {len(entries)} requests answered {len(results)} results")
        except (Exception, asyncio.CancelledError) as error:
            for _, future in entries:
                if not future.done():
                    future.set_exception(error)
            if isinstance(error, asyncio.CancelledError):
                raise
        else:
            for (_, future), result in zip(entries, results):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        finally:
            lane.in_flight -= 1
            if lane.waiting:
                self._launch(lane)
            elif not lane.in_flight:
                self._retire(lane)

    def _retire(self, lane: _Lane) -> None:
        """Forget an idle lane: requests may bring options without end, lanes must not pile up."""
        if self._lanes.get(lane.key) is lane:
            del self._lanes[lane.key]

    @property
    def lanes(self) -> int:
        """Lanes with requests in flight or waiting."""
        return len(self._lanes)
