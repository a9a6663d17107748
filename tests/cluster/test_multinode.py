"""A real two-node Ray cluster on this machine: an encoder replica forced onto the second node
answers exactly as the one on the head node. Both nodes are torn down by their process ids."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import yaml

RAY = str(Path(sys.executable).with_name("ray"))
PLACEMENT = """
import json, sys, ray
from ray import serve
from deployments.settings import deployment_name
ray.init(address=sys.argv[1], namespace="embedding-cluster", log_to_driver=False)
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


@pytest.fixture
def two_nodes(tmp_path, free_port):
    temp_dir = Path("/tmp") / f"ecray{os.getpid()}"  # short: Ray's socket paths have a length limit
    port = free_port()
    # a test cluster on loopback: no token auth, so that the second node and the drivers need no token file
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    common = ["--temp-dir", str(temp_dir), "--include-dashboard=false", "--disable-usage-stats"]
    try:
        subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--resources", '{"node1": 1}',
                        *common], check=True, env=env,
                       capture_output=True, timeout=120)
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", "--num-cpus=2",
                        "--resources", '{"node2": 1}', "--temp-dir", str(temp_dir), "--disable-usage-stats"],
                       check=True, env=env, capture_output=True, timeout=120)
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
