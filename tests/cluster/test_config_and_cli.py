"""Config (YAML, defaults, app builder) and the ``embedding-cluster`` CLI."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from pydantic import ValidationError

from cluster.app import app_builder, build_app
from cluster.config import ClusterConfig, ModelConfig, load_config

REPO = Path(__file__).resolve().parents[2]


def test_default_config_serves_the_bundled_minilm():
    config = ClusterConfig()
    (model,) = config.models
    assert model.name == "all-MiniLM-L6-v2"
    assert (Path(model.model_name) / "model.safetensors").is_file()
    assert (model.max_length, model.pooling, model.normalize) == (None, None, None)  # the folder decides
    resolved = model.resolved()
    assert (resolved.max_length, resolved.pooling, resolved.normalize) == (256, "mean", True)
    assert resolved.prompts == {"query": "", "document": ""} and resolved.default_prompt_name == ""
    assert resolved.resolved() == resolved
    assert (config.http.host, config.http.port) == ("127.0.0.1", 8000)


def test_yaml_round_trip_and_autoscaling_fields(tmp_path):
    text = """
http: {host: 127.0.0.1, port: 8123}
tokenizer: {num_cpus: 0.5, autoscaling: {min_replicas: 1, max_replicas: 2}}
models:
  - name: all-MiniLM-L6-v2
    max_length: 256
    last_layer_only: false
    dtype: bfloat16
    max_batch_tokens: 8192
    autoscaling: {min_replicas: 1, max_replicas: 3, target_ongoing_requests: 4, upscale_delay_s: 1}
"""
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    config = load_config(path)
    model = config.models[0]
    assert (model.max_length, model.last_layer_only, model.dtype) == (256, False, "bfloat16")
    assert model.autoscaling.max_replicas == 3 and model.autoscaling.upscale_delay_s == 1
    assert ClusterConfig.from_yaml(config.to_yaml()) == config
    assert app_builder({"config": str(path)}) is not None


def test_config_errors_are_clear():
    with pytest.raises(ValidationError, match="unique"):
        ClusterConfig(models=[{"name": "a"}, {"name": "a"}])
    with pytest.raises(ValidationError, match="dtype"):
        ClusterConfig(models=[{"dtype": "int4"}])
    with pytest.raises(ValidationError, match="max_replicas"):
        ClusterConfig(models=[{"autoscaling": {"min_replicas": 3, "max_replicas": 1}}])


def test_start_up_checks_before_deploying(monkeypatch):
    with pytest.raises(ValidationError, match="device 'cuda' but num_gpus 0"):
        ModelConfig(name="gpu", device="cuda")
    assert ModelConfig(name="gpu", device="cuda", num_gpus=0.5).num_gpus == 0.5
    with pytest.raises(ValidationError, match="'a/b' and 'a-b' both make the deployment name 'encoder-a-b'"):
        ClusterConfig(models=[{"name": "a/b"}, {"name": "a-b"}])


def test_one_rule_for_the_api_key(monkeypatch):
    config = ClusterConfig(api_key="from-config")
    monkeypatch.delenv("EMBEDDING_CLUSTER_API_KEY", raising=False)
    assert config.with_api_key().api_key == "from-config"
    monkeypatch.setenv("EMBEDDING_CLUSTER_API_KEY", "from-env")
    assert config.with_api_key().api_key == "from-env"
    assert config.with_api_key("from-flag").api_key == "from-flag"
    assert ClusterConfig().with_api_key().api_key == "from-env"


def test_an_empty_api_key_is_refused_not_taken_for_none(monkeypatch):
    monkeypatch.delenv("EMBEDDING_CLUSTER_API_KEY", raising=False)
    with pytest.raises(ValidationError, match="api_key is empty"):
        ClusterConfig(api_key="")
    with pytest.raises(ValidationError, match="api_key is empty"):
        ClusterConfig(api_key="  ")
    with pytest.raises(ValueError, match="--api-key is empty"):
        ClusterConfig(api_key="from-config").with_api_key("")
    monkeypatch.setenv("EMBEDDING_CLUSTER_API_KEY", "")
    with pytest.raises(ValueError, match="EMBEDDING_CLUSTER_API_KEY .* is empty"):
        ClusterConfig(api_key="from-config").with_api_key()
    with pytest.raises(ValueError, match="EMBEDDING_CLUSTER_API_KEY .* is empty"):
        build_app(ClusterConfig())


def test_example_deploy_config_is_valid():
    document = yaml.safe_load((REPO / "examples" / "serve-deploy.yaml").read_text())
    (application,) = document["applications"]
    assert application["import_path"] == "cluster.app:app_builder"
    load_config(REPO / "examples" / application["args"]["config"].split("/")[-1])


def test_cli_prints_default_config():
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "config"], capture_output=True, text=True,
                            check=True, cwd=REPO)
    assert ClusterConfig.from_yaml(result.stdout).models[0].name == "all-MiniLM-L6-v2"


def test_cli_serve_refuses_a_model_it_cannot_serve(tmp_path, minilm_path, free_port):
    from st_folders import unknown_module

    folder = tmp_path / "custom"
    unknown_module(folder, minilm_path)
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump({"models": [{"name": "custom", "model_name": str(folder)}]}))
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "serve", "--config", str(config), "--port",
                             str(free_port())], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert "model 'custom' cannot be served" in result.stderr
    assert "my_package.modules.CustomRerank" in result.stderr and str(folder) in result.stderr
    assert "Traceback" not in result.stderr
    too_long = tmp_path / "too-long.yaml"
    too_long.write_text(yaml.safe_dump({"models": [{"model_name": minilm_path, "max_length": 1024}]}))
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "serve", "--config", str(too_long)],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2 and "max_length 1024 is more than the 512 positions" in result.stderr


@pytest.mark.cluster
def test_cli_serve_exits_with_one_line_when_a_model_cannot_load(tmp_path, minilm_path, free_port):
    broken = tmp_path / "broken"
    shutil.copytree(minilm_path, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    config = tmp_path / "broken.yaml"
    config.write_text(yaml.safe_dump({"models": [{"name": "broken", "model_name": str(broken), "num_cpus": 0.5}]}))
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "serve", "--config", str(config),
                             "--port", str(free_port())], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"embedding-cluster serve: model 'broken' ({broken}) could not be loaded: " in result.stderr


def _raylet_pids() -> set[int]:
    result = subprocess.run(["pgrep", "-f", "raylet"], capture_output=True, text=True)
    return {int(pid) for pid in result.stdout.split()}


@pytest.mark.cluster
def test_cli_serve_answers_drains_and_exits_cleanly_on_sigint(tmp_path, tiny_bert_path, free_port,
                                                              start_cli_serve):
    port = free_port()
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump({
        "tokenizer": {"num_cpus": 0.1},
        "ingress": {"num_cpus": 0.1},
        # a request waits 2 s for its batch: SIGINT comes while it is in flight
        "models": [{"name": "tiny", "model_name": tiny_bert_path, "num_cpus": 0.5, "batch_wait_timeout_s": 2.0}],
    }))
    raylets_before = _raylet_pids()
    process = start_cli_serve(config, port)
    try:
        answer = httpx.post(f"http://127.0.0.1:{port}/embed", json={"inputs": ["hello"]}, timeout=30)
        assert answer.status_code == 200 and len(answer.json()[0]) == 32
        with ThreadPoolExecutor(max_workers=1) as pool:
            in_flight = pool.submit(httpx.post, f"http://127.0.0.1:{port}/embed", json={"inputs": ["in flight"]},
                                    timeout=60)
            time.sleep(1.0)
            process.send_signal(signal.SIGINT)
            drained = in_flight.result()
        output, _ = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
    assert drained.status_code == 200 and len(drained.json()[0]) == 32, drained.text
    assert process.returncode == 0, output
    assert "embedding-cluster ready: http://127.0.0.1:" in output and "embedding-cluster stopped" in output
    deadline = time.monotonic() + 30
    while _raylet_pids() - raylets_before and time.monotonic() < deadline:
        time.sleep(1)
    assert not _raylet_pids() - raylets_before, "the CLI left its Ray instance running"


def test_a_local_cluster_shares_its_cpus_among_models_that_leave_num_cpus_unset():
    """Three models with default settings on 2 CPUs: each first replica is placed (else never ready)."""
    config = ClusterConfig(models=[ModelConfig(name=name) for name in "abc"])
    fitted = config.fit_local_cpus(2)
    starting = fitted.tokenizer.num_cpus + fitted.ingress.num_cpus + sum(m.num_cpus for m in fitted.models)
    assert starting <= 2 and all(m.num_cpus == fitted.models[0].num_cpus > 0 for m in fitted.models)
    assert ClusterConfig().fit_local_cpus(2) == ClusterConfig()  # what fits is left as it is
    # a model that sets num_cpus keeps it; the others share the rest
    mixed = ClusterConfig(models=[ModelConfig(name="set", num_cpus=0.5), ModelConfig(name="unset")])
    assert [m.num_cpus for m in mixed.fit_local_cpus(2).models] == [0.5, 0.75]


def test_a_local_cluster_that_cannot_fit_is_refused_naming_the_cpus():
    config = ClusterConfig(models=[ModelConfig(name="a", num_cpus=1), ModelConfig(name="b", num_cpus=1)])
    with pytest.raises(ValueError, match=r"ask for 2\.75 CPUs to start .* this machine has 2: lower num_cpus"):
        config.fit_local_cpus(2)


def test_serve_refuses_an_open_non_loopback_host_without_a_key(capsys, monkeypatch):
    from cluster.cli import main

    monkeypatch.delenv("EMBEDDING_CLUSTER_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0"]) == 2  # before Ray starts
    error = capsys.readouterr().err
    assert "reachable from other machines" in error and "no API key" in error and "--insecure" in error


def test_a_model_that_cannot_be_placed_answers_503_and_ctrl_c_stops_serve(tmp_path, tiny_bert_path, free_port,
                                                                           start_cli_serve):
    """A model whose replica waits for a GPU this machine does not have: its requests get a 503 saying
    why (once Serve says the replica waits to be scheduled) instead of waiting until they time out, the
    other model answers, and Ctrl-C stops ``serve`` while the deployment is still pending."""
    port = free_port()
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump({
        "tokenizer": {"num_cpus": 0.1}, "ingress": {"num_cpus": 0.1},
        "models": [{"name": "tiny", "model_name": tiny_bert_path, "num_cpus": 0.1},
                   {"name": "needs-a-gpu", "model_name": tiny_bert_path, "num_cpus": 0.1, "num_gpus": 1}]}))
    process = start_cli_serve(config, port)
    try:
        # Serve says a replica waits to be scheduled once it has waited 30 s; /ready shows it
        deadline, ready = time.monotonic() + 150, None
        while time.monotonic() < deadline:
            ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=30)
            if "to be scheduled" in ready.text:
                break
            time.sleep(2)
        assert ready is not None and ready.status_code == 503 and "to be scheduled" in ready.text, ready.text
        started = time.monotonic()
        answer = httpx.post(f"http://127.0.0.1:{port}/embed", json={"inputs": ["x"], "model": "needs-a-gpu"},
                            timeout=30)
        assert answer.status_code == 503, answer.text
        assert time.monotonic() - started < 5
        assert "needs-a-gpu" in answer.json()["error"]["message"] and "scheduled" in answer.json()["error"]["message"]
        tiny = httpx.post(f"http://127.0.0.1:{port}/embed", json={"inputs": ["x"], "model": "tiny"}, timeout=60)
        assert tiny.status_code == 200
        stopped = time.monotonic()
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
        assert time.monotonic() - stopped < 30 and "embedding-cluster stopped" in output, output[-2000:]
    finally:
        if process.poll() is None:
            process.kill()
