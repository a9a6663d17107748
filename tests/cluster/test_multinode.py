"""A real two-node Ray cluster on this machine, under Ray's default token authentication: an
encoder replica forced onto the second node answers exactly as the one on the head node, and a
process without the token is told so at once. Both nodes are torn down by their process ids."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import psutil
import pytest
import yaml

from cluster import ray_connect

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
PLACEMENT = """
import json, sys, ray
from ray import serve
from cluster.ray_connect import join_ray
from deployments.settings import deployment_name
join_ray(sys.argv[1], namespace="embedding-cluster", log_to_driver=False)
second = [n["NodeID"] for n in ray.nodes() if n["Alive"] and "node2" in n["Resources"]]
nodes = {m: serve.get_deployment_handle(deployment_name(m), app_name="embeddings").replica_info.remote().result()["node"]
         for m in ("head", "second-node")}
print(json.dumps({"second": second, "nodes": nodes}))
"""


def _ray_processes(temp_dir: Path) -> list[psutil.Process]:
    """Every live process of the cluster whose sessions live under ``temp_dir``."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        if process.info["status"] != psutil.STATUS_ZOMBIE and str(temp_dir) in " ".join(process.info["cmdline"] or ()):
            found.append(process)
    return found


def _environment(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment with ``home`` as HOME and none of Ray's auth variables but
    ``extra`` (the session's own Ray may have set RAY_AUTH_MODE here)."""
    auth = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    return {k: v for k, v in os.environ.items() if k not in auth} | {
        "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0", **extra}


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, free_port):
    """The head with the default auth of ``ray start --head`` on a machine that has a token, the
    second node joined with a copy of it as Ray's docs say; yields the address and the
    environment of a user on the head's machine (the token in ~/.ray/auth_token, nothing else)."""
    temp_dir = Path("/tmp") / f"ecray{os.getpid()}"  # short: Ray's socket paths have a length limit
    port = free_port()
    head_home, second_home = tmp_path_factory.mktemp("head-home"), tmp_path_factory.mktemp("second-home")
    env = _environment(head_home)
    common = ["--temp-dir", str(temp_dir), "--disable-usage-stats"]
    try:
        # Ray's way to make a token before `ray start` (a local `ray.init()` makes one too)
        subprocess.run([RAY, "get-auth-token", "--generate"], check=True, env=env, capture_output=True, timeout=120)
        subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--resources", '{"node1": 1}',
                        "--include-dashboard=false", *common], check=True, env=env,
                       capture_output=True, timeout=120)
        # a worker node: the head's token copied to its ~/.ray/auth_token, and RAY_AUTH_MODE=token
        (second_home / ".ray").mkdir()
        shutil.copy(head_home / ".ray" / "auth_token", second_home / ".ray" / "auth_token")
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", "--num-cpus=2", "--resources", '{"node2": 1}',
                        *common], check=True, env=_environment(second_home, RAY_AUTH_MODE="token"),
                       capture_output=True, timeout=120)
        yield f"127.0.0.1:{port}", env
    finally:
        _stop(temp_dir)
        assert not _ray_processes(temp_dir), "a process of the two-node cluster outlived its teardown"


def _stop(temp_dir: Path) -> None:
    """SIGTERM, then SIGKILL, every process of the cluster, and wait until they are gone;
    again for processes a dying raylet started meanwhile."""
    for _ in range(3):
        processes = _ray_processes(temp_dir)
        if not processes:
            return
        for process in processes:
            process.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(processes, timeout=20)
        for process in alive:
            process.kill()
        psutil.wait_procs(alive, timeout=10)


@pytest.mark.cluster
def test_the_cluster_asks_for_the_token(two_nodes):
    """The fixture really runs with token auth: its GCS refuses a call without the token."""
    address, _ = two_nodes
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary(ray_connect.GCS_PROBE_METHOD)(b"", timeout=30)
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.cluster
def test_without_the_token_serve_says_so_in_one_line_and_exits_2(two_nodes, tmp_path, free_port):
    address, _ = two_nodes
    started = time.monotonic()
    process = subprocess.run([sys.executable, "-m", "cluster.cli", "serve", "--address", address, "--port",
                              str(free_port())], capture_output=True, text=True, timeout=120, cwd=REPO,
                             env=_environment(tmp_path))
    elapsed = time.monotonic() - started
    assert process.returncode == 2, process.stderr
    (line,) = process.stderr.strip().splitlines()  # and not Ray's "Failed to get cluster ID" once a second
    assert line.startswith("embedding-cluster serve: the Ray cluster at ")
    places = ("RAY_AUTH_TOKEN,", "RAY_AUTH_TOKEN_PATH", str(tmp_path / ".ray" / "auth_token"))
    assert all(place in line for place in places)
    assert elapsed < 60, f"{elapsed:.0f} s: the start-up of Python and Ray, and one call to the GCS"


@pytest.mark.cluster
def test_replica_on_the_second_node_answers_like_the_head(two_nodes, tmp_path, tiny_bert_path, free_port,
                                                           start_cli_serve):
    address, env = two_nodes
    port = free_port()
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump({
        "tokenizer": {"num_cpus": 0.1},
        "ingress": {"num_cpus": 0.1},
        "models": [
            {"name": "head", "model_name": tiny_bert_path, "num_cpus": 0.25, "dtype": "float32",
             "resources": {"node1": 0.5}},
            {"name": "second-node", "model_name": tiny_bert_path, "num_cpus": 0.25, "dtype": "float32",
             "resources": {"node2": 0.5}},
        ],
    }))
    process = start_cli_serve(config, port, "--address", address, env=env)
    try:
        texts = ["the same text on two nodes", "a longer one " * 40]
        answers = {}
        for model in ("head", "second-node"):
            response = httpx.post(f"http://127.0.0.1:{port}/embed", json={"inputs": texts, "model": model},
                                  timeout=60)
            assert response.status_code == 200, response.text
            answers[model] = np.array(response.json())
        models = httpx.get(f"http://127.0.0.1:{port}/models", timeout=30).json()["data"]
        placement = json.loads(subprocess.run([sys.executable, "-c", PLACEMENT, address], capture_output=True,
                                              text=True, check=True, timeout=120, env=env).stdout.splitlines()[-1])
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
    (second_node,) = placement["second"]
    assert placement["nodes"]["second-node"] == second_node != placement["nodes"]["head"]
    np.testing.assert_allclose(answers["second-node"], answers["head"], atol=1e-6)
    assert {m["id"]: m["replicas"]["running"] for m in models} == {"head": 1, "second-node": 1}
    assert process.returncode == 0, output
