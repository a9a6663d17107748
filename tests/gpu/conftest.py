"""The GPU tier's Ray instance: the machine's GPUs (its tests are skipped without CUDA)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def gpu_ray(free_port):
    """Ray and Serve on this machine (or the ones the session already runs), HTTP on a free port."""
    import ray
    from ray import serve

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", include_dashboard=False, log_to_driver=False, namespace="embedding-cluster-gpu")
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    try:
        yield
    finally:
        if started:
            serve.shutdown()
            ray.shutdown()
