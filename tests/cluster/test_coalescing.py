"""Merging small requests into one encoder call (``deployments.coalescing``), then through the cluster.

The unit tests drive the coalescer with a stand-in deployment whose calls finish when the test
releases them, so no assertion depends on timing. On the session's cluster: merged requests get
the float32 vectors they get alone (to batching's last bits), and a bad request never fails its neighbours.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import numpy as np
import pytest

from deployments.coalescing import CallCoalescer

GUARD_S = 30  # a bound against hanging, never reached when the coalescer is right


class GatedDeployment:
    """Records each call's items; a call answers (items upper-cased, ``"bad"`` as its own error) when
    the test releases it, or fails whole if its number is in ``failing_calls``."""

    def __init__(self, failing_calls: tuple[int, ...] = ()) -> None:
        self.calls: list[list[str]] = []
        self.release = asyncio.Event()
        self.failing_calls = failing_calls
        self._started = asyncio.Event()

    async def send(self, items: list[str]) -> list:
        number = len(self.calls)
        self.calls.append(items)
        self._started.set()
        await self.release.wait()
        if number in self.failing_calls:
            raise ConnectionError("replica died")
        return [ValueError(f"bad item {item}") if item == "bad" else item.upper() for item in items]

    async def started(self, count: int) -> None:
        while len(self.calls) < count:
            self._started.clear()
            await self._started.wait()


async def settle() -> None:
    """Let every ready task run until it waits on something the test controls."""
    for _ in range(5):
        await asyncio.sleep(0)


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, GUARD_S))


def test_the_first_goes_alone_and_the_rest_ride_the_next_call():
    async def scenario():
        coalescer, deployment = CallCoalescer(max_in_flight=1, max_merged=3), GatedDeployment()
        first = asyncio.ensure_future(coalescer.submit("lane", "a", deployment.send))
        await deployment.started(1)
        rest = [asyncio.ensure_future(coalescer.submit("lane", item, deployment.send)) for item in "bcdef"]
        await settle()
        assert deployment.calls == [["a"]] and coalescer.waiting("lane") == 5
        deployment.release.set()
        answers = await asyncio.gather(first, *rest)
        assert answers == list("ABCDEF")
        assert deployment.calls == [["a"], ["b", "c", "d"], ["e", "f"]]  # at most max_merged a call
        assert (coalescer.requests, coalescer.calls) == (6, 3)

    run(scenario())


def test_free_slots_send_at_once_and_lanes_do_not_mix():
    async def scenario():
        coalescer, deployment = CallCoalescer(max_in_flight=2, max_merged=8), GatedDeployment()
        tasks = [asyncio.ensure_future(coalescer.submit(lane, item, deployment.send))
                 for lane, item in (("x", "a"), ("x", "b"), ("y", "c"), ("x", "d"), ("x", "e"))]
        await deployment.started(3)
        await settle()
        assert deployment.calls == [["a"], ["b"], ["c"]] and coalescer.waiting("x") == 2
        deployment.release.set()
        assert await asyncio.gather(*tasks) == list("ABCDE")
        assert deployment.calls[3:] == [["d", "e"]]
        await settle()
        assert coalescer.lanes == 0  # idle lanes are forgotten: options without end open no lanes without end

    run(scenario())


def test_each_request_gets_its_own_error():
    async def scenario():
        coalescer, deployment = CallCoalescer(max_in_flight=1, max_merged=8), GatedDeployment()
        first = asyncio.ensure_future(coalescer.submit("lane", "a", deployment.send))
        await deployment.started(1)
        merged = [asyncio.ensure_future(coalescer.submit("lane", item, deployment.send)) for item in ("b", "bad", "c")]
        deployment.release.set()
        outcomes = await asyncio.gather(first, *merged, return_exceptions=True)
        assert outcomes[:2] == ["A", "B"] and outcomes[3] == "C"
        assert isinstance(outcomes[2], ValueError) and str(outcomes[2]) == "bad item bad"

    run(scenario())


def test_a_failed_call_fails_its_requests_and_the_lane_goes_on():
    async def scenario():
        coalescer, deployment = CallCoalescer(max_in_flight=1, max_merged=8), GatedDeployment(failing_calls=(1,))
        first = asyncio.ensure_future(coalescer.submit("lane", "a", deployment.send))
        await deployment.started(1)
        merged = [asyncio.ensure_future(coalescer.submit("lane", item, deployment.send)) for item in "bc"]
        deployment.release.set()
        outcomes = await asyncio.gather(first, *merged, return_exceptions=True)
        assert deployment.calls == [["a"], ["b", "c"]]
        assert outcomes[0] == "A" and all(isinstance(outcome, ConnectionError) for outcome in outcomes[1:])
        assert await coalescer.submit("lane", "z", deployment.send) == "Z"

    run(scenario())


def test_cancelling_one_request_leaves_the_others_answered():
    async def scenario():
        coalescer, deployment = CallCoalescer(max_in_flight=1, max_merged=8), GatedDeployment()
        first = asyncio.ensure_future(coalescer.submit("lane", "a", deployment.send))
        await deployment.started(1)
        waiting = [asyncio.ensure_future(coalescer.submit("lane", item, deployment.send)) for item in "bcd"]
        await settle()
        waiting[1].cancel()  # leaves before its call is sent
        first.cancel()  # its call is out: the call goes on for nobody, the lane keeps its slot
        await settle()
        deployment.release.set()
        assert await asyncio.gather(waiting[0], waiting[2]) == ["B", "D"]
        assert deployment.calls == [["a"], ["b", "d"]]
        assert first.cancelled() and waiting[1].cancelled()

    run(scenario())


def test_sizes_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        CallCoalescer(max_in_flight=0, max_merged=4)


# --- through the cluster ---------------------------------------------------------------------------

TEXTS = [f"query number {i}: {' '.join(['vector', 'search', 'online', 'merged'][: i % 4 + 1])}" for i in range(24)]
#: A float32 vector's values move in their last bits with its batch (the matrix products' blocking
#: follows the batch's shape, merged or not): 1e-6 tells that apart from another text's vector.
BATCHING_ATOL = 1e-6


def test_merged_requests_get_their_own_vectors(serve_cluster, http):
    """Each text alone first, then all at once (with empty ones between them, 400 each): the same float32
    vectors, and the headers show calls that carried several requests."""
    model = "all-MiniLM-L6-v2"
    alone = {}
    for text in TEXTS:
        answer = http.post("/embed", json={"model": model, "inputs": text})
        assert answer.status_code == 200
        alone[text] = np.array(answer.json()[0], dtype=np.float32)

    async def all_at_once():
        async with httpx.AsyncClient(base_url=serve_cluster.url, timeout=120) as client:
            bodies = [{"model": model, "inputs": text} for text in TEXTS]
            bodies[3::6] = [{"model": model, "inputs": ""}] * len(bodies[3::6])
            return bodies, await asyncio.gather(*(client.post("/embed", json=body) for body in bodies))

    bodies, answers = asyncio.run(all_at_once())
    merged = 0
    for body, answer in zip(bodies, answers):
        if body["inputs"] == "":
            assert answer.status_code == 400 and "empty" in answer.json()["error"]["message"]
            continue
        assert answer.status_code == 200, answer.text
        np.testing.assert_allclose(np.array(answer.json()[0], dtype=np.float32), alone[body["inputs"]], rtol=0,
                                   atol=BATCHING_ATOL)
        merged = max(merged, int(answer.headers["x-merged-requests"]))
    assert merged > 1


def test_one_text_load_scales_the_encoder(serve_cluster):
    """32 clients send one text a request to scale-merged (target_ongoing_requests 4): the ingress merges
    them into at most 2 calls, which Serve's own count takes for 2 requests in flight, under the target;
    the replicas count the requests they hold, so the autoscaler adds a replica."""
    from ray import serve

    from deployments.settings import deployment_name

    def running() -> int:
        deployments = serve.status().applications["embeddings-test"].deployments
        return deployments[deployment_name("scale-merged")].replica_states.get("RUNNING", 0)

    assert running() == 1
    merged = []
    until = time.monotonic() + 120
    scaled = threading.Event()

    def watch() -> None:  # in a thread: serve.status() blocks, and would stall the clients' event loop
        while time.monotonic() < until and not scaled.is_set():
            if running() >= 2:
                scaled.set()
            scaled.wait(0.5)

    async def load() -> None:
        async with httpx.AsyncClient(base_url=serve_cluster.url, timeout=120) as client:
            async def one(number: int) -> None:
                while time.monotonic() < until and not scaled.is_set():
                    answer = await client.post("/embed", json={"model": "scale-merged", "inputs": f"query {number}"})
                    assert answer.status_code == 200, answer.text
                    merged.append(int(answer.headers["x-merged-requests"]))

            await asyncio.gather(*(one(number) for number in range(32)))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        asyncio.run(load())
    finally:
        scaled.set()
        watcher.join()
    assert running() == 2
    assert max(merged) > 4  # calls did carry more requests than Serve's target
