"""Overload and replica failures: every request ends in a right answer or a fast 503, none hangs.

The figures (burst size, counts, slowest 503, recovery times) go to
``reliability-figures.json`` in pytest's base temp folder and to the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import threading
import time

import httpx
import numpy as np
import psutil
import pytest
import ray
from ray import serve

from deployments.settings import deployment_name

logger = logging.getLogger(__name__)
GUARDED_APP = "guarded"
TEXTS = [f"sentence number {i} about the weather in a city by the sea" for i in range(8)]
LONG_TEXT = "the tokenizer deployment folds long documents like this one " * 90  # over 4,096 characters
FIGURES: dict = {}
CLIENTS = 64


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    yield FIGURES
    path = tmp_path_factory.getbasetemp() / "reliability-figures.json"
    path.write_text(json.dumps(FIGURES, indent=2))
    logger.warning("reliability figures: %s", json.dumps(FIGURES))


@pytest.fixture(scope="module")
def headers(api_key, guarded_config) -> dict[str, str]:
    assert guarded_config.app_name == GUARDED_APP
    return {"Authorization": f"Bearer {api_key}"}


@pytest.fixture(scope="module")
def expected(guarded_url, headers) -> dict[str, np.ndarray]:
    with httpx.Client(base_url=guarded_url, headers=headers, timeout=60) as http:
        return {text: np.array(http.post("/embed", json={"inputs": [text]}).json()[0])
                for text in [*TEXTS, LONG_TEXT]}


def _ingress_pid(app: str) -> int:
    for process in psutil.process_iter(["cmdline"]):
        if f"ServeReplica:{app}:ingress" in " ".join(process.info["cmdline"] or ()):
            return process.pid
    raise LookupError("no ingress process")


async def _send(client: httpx.AsyncClient, text: str) -> tuple[int, float, httpx.Response | None]:
    started = time.monotonic()
    try:
        response = await client.post("/embed", json={"inputs": [text]})
    except httpx.HTTPError as error:
        logger.warning("request failed: %r", error)
        return -1, time.monotonic() - started, None
    return response.status_code, time.monotonic() - started, response


def _check_answers(results, expected) -> None:
    for (status, _, response), text in results:
        if status == 200:
            np.testing.assert_allclose(np.array(response.json()[0]), expected[text], atol=1e-5)
        elif status == 503:
            assert response.headers["Retry-After"] == "1"
            assert response.json()["error"]["code"] == 503


def _capacity(guarded_url: str, headers: dict) -> float:
    """Requests answered per second with 8 concurrent clients."""
    async def run() -> float:
        async with httpx.AsyncClient(base_url=guarded_url, headers=headers, timeout=60) as client:
            semaphore = asyncio.Semaphore(8)

            async def one(i):
                async with semaphore:
                    return await _send(client, TEXTS[i % len(TEXTS)])

            started = time.monotonic()
            results = await asyncio.gather(*(one(i) for i in range(80)))
            assert all(status == 200 for status, _, _ in results)
            return len(results) / (time.monotonic() - started)

    return asyncio.run(run())


def test_burst_of_ten_times_capacity_gets_answers_or_fast_503s(guarded_url, headers, expected, figures):
    capacity = _capacity(guarded_url, headers)
    burst = max(400, int(10 * capacity))
    memory_before = psutil.Process(_ingress_pid(GUARDED_APP)).memory_info().rss

    async def run():
        limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
        async with httpx.AsyncClient(base_url=guarded_url, headers=headers, timeout=60, limits=limits) as client:
            semaphore = asyncio.Semaphore(CLIENTS)

            async def one(text: str):
                async with semaphore:  # a request's time starts when a client sends it
                    return await _send(client, text)

            texts = [TEXTS[i % len(TEXTS)] for i in range(burst)]
            started = time.monotonic()
            results = await asyncio.gather(*(one(t) for t in texts))
            return list(zip(results, texts)), time.monotonic() - started

    results, seconds = asyncio.run(run())
    memory_after = psutil.Process(_ingress_pid(GUARDED_APP)).memory_info().rss
    statuses = [status for (status, _, _), _ in results]
    refused = [elapsed for (status, elapsed, _), _ in results if status == 503]
    counts = {str(s): statuses.count(s) for s in sorted(set(statuses))}
    figures["burst"] = {"capacity_requests_per_s": round(capacity, 1), "burst": burst, "clients": CLIENTS,
                        "seconds": round(seconds, 2),
                        "counts": counts, "slowest_503_s": round(max(refused, default=0), 3),
                        "median_503_s": round(statistics.median(refused), 3) if refused else None,
                        "ingress_rss_growth_mb": round((memory_after - memory_before) / 2**20, 1)}
    assert set(statuses) <= {200, 503}, counts
    assert refused, "the burst never hit the bounded queues"
    assert statuses.count(200) >= 10
    _check_answers(results, expected)
    answered = [elapsed for (status, elapsed, _), _ in results if status == 200]
    # shedding costs the ingress next to nothing: a refusal comes back sooner than an answer, in the same run
    assert statistics.median(refused) < statistics.median(answered)
    assert memory_after - memory_before < 300 * 2**20

    after = []
    with httpx.Client(base_url=guarded_url, headers=headers, timeout=30) as http:
        for text in TEXTS * 2:
            started = time.monotonic()
            assert http.post("/embed", json={"inputs": [text]}).status_code == 200  # serving again at once
            after.append(time.monotonic() - started)
    figures["burst"]["p50_after_burst_ms"] = round(1000 * statistics.median(after), 1)


def _wait_for(condition, timeout_s: float = 60) -> None:
    """Poll ``condition`` (a state of other threads or of the cluster) until it holds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.05)


def _replica_names(deployment: str) -> dict[str, str]:
    """Live replica actors of a deployment: name -> namespace."""
    prefix = f"SERVE_REPLICA::{GUARDED_APP}#{deployment}#"
    return {a["name"]: a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)}


def _replaced(deployment: str, killed: str) -> bool:
    """Serve runs a new replica in place of the killed one and calls the deployment healthy."""
    status = serve.status().applications[GUARDED_APP].deployments[deployment]
    running = status.replica_states.get("RUNNING", 0) >= 1
    return running and status.status == "HEALTHY" and bool(set(_replica_names(deployment)) - {killed})


@pytest.mark.parametrize("deployment, text", [(deployment_name("guarded-tiny"), TEXTS[0]), ("tokenizer", LONG_TEXT)])
def test_killing_a_replica_under_load_loses_no_request(guarded_url, headers, expected, figures, deployment,
                                                       text):
    stop = threading.Event()
    results: list = []

    def load() -> None:
        with httpx.Client(base_url=guarded_url, headers=headers, timeout=60) as http:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    response = http.post("/embed", json={"inputs": [text]})
                    results.append(((response.status_code, time.monotonic() - started, response), text))
                except httpx.HTTPError as error:
                    results.append(((-1, time.monotonic() - started, None), text))
                    logger.warning("request failed: %r", error)

    clients = [threading.Thread(target=load) for _ in range(4)]
    for thread in clients:
        thread.start()
    _wait_for(lambda: len(results) >= 8)  # under load
    ((victim, namespace),) = _replica_names(deployment).items()
    ray.kill(ray.get_actor(victim, namespace=namespace), no_restart=True)
    killed = time.monotonic()
    recovered = None
    while time.monotonic() - killed < 60:
        time.sleep(0.25)
        recent = [status for (status, _, _), _ in results[-4:]]
        if _replaced(deployment, victim) and recent and all(s == 200 for s in recent):
            recovered = time.monotonic() - killed
            break
    answered_by_then = len(results)
    _wait_for(lambda: len(results) >= answered_by_then + 8)  # the new replica under load too
    stop.set()
    for thread in clients:
        thread.join(timeout=90)
    assert not any(thread.is_alive() for thread in clients), "a client hangs"
    statuses = [status for (status, _, _), _ in results]
    counts = {str(s): statuses.count(s) for s in sorted(set(statuses))}
    figures[f"kill {deployment}"] = {"requests": len(statuses), "counts": counts,
                                     "recovery_s": None if recovered is None else round(recovered, 2)}
    assert recovered is not None, f"not healthy within 60 s: {counts}"
    assert set(statuses) <= {200, 503}, counts
    _check_answers(results, expected)
