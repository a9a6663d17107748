"""The HTTP front (``cluster.front``): HAProxy when its binary is there, its extra listeners on loopback."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from cluster import front
from cluster.front import front_environment, haproxy_binary, loopback_wrapper

RAY_HAPROXY_CONFIG = """global
    maxconn 4096
    stats socket /tmp/haproxy.sock mode 666 level admin expose-fd listeners
frontend http_frontend
    bind *:8000
frontend prometheus
    bind :9101
frontend grpc_frontend
    bind *:9000 proto h2
listen stats
  bind *:8404
  stats enable
"""


def test_the_wrapper_binds_the_side_listeners_to_loopback(tmp_path):
    """The wrapper rewrites the config after ``-f`` as Ray writes it, then runs the binary with the same
    arguments (here ``echo``, which prints them)."""
    config = tmp_path / "haproxy.cfg"
    config.write_text(RAY_HAPROXY_CONFIG)
    wrapper = loopback_wrapper("echo", tmp_path, stats_port=8404, metrics_port=9101)
    done = subprocess.run([str(wrapper), "-db", "-f", str(config), "-sf", "123"], capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == ["-db", "-f", str(config), "-sf", "123"]
    rewritten = config.read_text()
    assert "    bind 127.0.0.1:9101\n" in rewritten and "  bind 127.0.0.1:8404\n" in rewritten
    # the frontends stay where the user asked (0.0.0.0 is "*"), the admin socket is the owner's only
    assert "    bind *:8000\n" in rewritten and "    bind *:9000 proto h2\n" in rewritten
    assert "mode 600 level admin" in rewritten and "666" not in rewritten


def test_front_environment(monkeypatch):
    for name in ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_HAPROXY_BINARY_PATH", *front.SIDE_PORTS,
                 *(f"RAY_SERVE_DIRECT_INGRESS_{end}_{kind}_PORT" for end in ("MIN", "MAX") for kind in ("HTTP", "GRPC"))):
        monkeypatch.delenv(name, raising=False)
    assert front_environment("proxy") == {}
    with pytest.raises(ValueError, match="front must be one of"):
        front_environment("nginx")
    if haproxy_binary() is not None:
        environment = front_environment("auto")
        assert environment["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
        assert all(int(environment[name]) > 0 for name in front.SIDE_PORTS)
        # each cluster its own ingress replicas' ports (Serve would start every cluster at 30000 and 40000)
        for kind in ("HTTP", "GRPC"):
            low = int(environment[f"RAY_SERVE_DIRECT_INGRESS_MIN_{kind}_PORT"])
            assert int(environment[f"RAY_SERVE_DIRECT_INGRESS_MAX_{kind}_PORT"]) == low + front.DIRECT_INGRESS_PORTS
        monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "9999")
        assert "RAY_SERVE_HAPROXY_STATS_PORT" not in front_environment("haproxy")  # the environment wins
    monkeypatch.setattr(front, "haproxy_binary", lambda: None)
    assert front_environment("auto") == {}
    with pytest.raises(ValueError, match="needs an HAProxy binary"):
        front_environment("haproxy")


def test_the_session_front_listens_on_loopback_only(serve_cluster, http):
    """The session's cluster runs the default front: with HAProxy, none of its sockets listens beyond 127.0.0.1."""
    assert http.get("/health").status_code == 200
    haproxies = [process for process in psutil.process_iter(["name"]) if process.info["name"] == "haproxy"]
    if haproxy_binary() is None:
        pytest.skip("no HAProxy binary: the front is Serve's Python proxy")
    listening = [connection.laddr for process in haproxies for connection in process.net_connections("tcp")
                 if connection.status == psutil.CONN_LISTEN]
    assert listening and {address.ip for address in listening} == {"127.0.0.1"}, listening
    assert serve_cluster.config.http.port in {address.port for address in listening}


def haproxies_of(config_file: str) -> list[psutil.Process]:
    """The running HAProxy processes that read ``config_file``."""
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        if process.info["name"] == "haproxy" and config_file in (process.info["cmdline"] or ()):
            found.append(process)
    return found


def test_haproxy_serves_where_asked_and_dies_with_its_cluster(tmp_path, tiny_bert_path, free_port, start_cli_serve):
    """``serve --host 0.0.0.0`` behind HAProxy: the HTTP frontend listens on every interface, the side
    listeners on loopback, the admin socket is the owner's; and when the Ray process that started
    HAProxy is killed hard, HAProxy goes too (a dead cluster must not keep the port answering 500s)."""
    if haproxy_binary() is None:
        pytest.skip("no HAProxy binary: the front is Serve's Python proxy")
    import stat

    import yaml

    port = free_port()
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump({"tokenizer": {"num_cpus": 0.1}, "ingress": {"num_cpus": 0.1},
                                      "models": [{"name": "tiny", "model_name": tiny_bert_path, "num_cpus": 0.25}]}))
    process = start_cli_serve(config, port, "--host", "0.0.0.0", "--api-key", "a-key-for-this-test-0123")
    try:
        ours = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "haproxy"
                and any(c.laddr.port == port for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN)]
        assert len(ours) == 1, ours
        haproxy = ours[0]
        listening = {(c.laddr.ip, c.laddr.port) for c in haproxy.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        assert ("0.0.0.0", port) in listening
        assert {ip for ip, other in listening if other != port} <= {"127.0.0.1"}, listening
        sockets = [line.split()[2] for line in Path(haproxy.cmdline()[haproxy.cmdline().index("-f") + 1])
                   .read_text().splitlines() if line.strip().startswith("stats socket")]
        assert sockets and all(stat.S_IMODE(Path(path).stat().st_mode) & 0o077 == 0 for path in sockets)
        # the cluster killed hard: its CLI and every Ray process of it (raylet first), none cleaning up;
        # HAProxy reloads run new processes on the same config file: every one of them must go
        config_file = haproxy.cmdline()[haproxy.cmdline().index("-f") + 1]
        cluster = [p for p in psutil.Process(process.pid).children(recursive=True) if p.name() != "haproxy"]
        raylets = [p for p in cluster if p.name() == "raylet"]
        assert raylets, [p.name() for p in cluster]
        for victim in [*raylets, psutil.Process(process.pid)]:
            victim.kill()
        deadline = time.monotonic() + 30
        while (left := haproxies_of(config_file)) and time.monotonic() < deadline:
            psutil.wait_procs(left, timeout=1)
        assert not haproxies_of(config_file), "HAProxy outlived its cluster"
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                process.kill()
        for leftover in [*locals().get("cluster", []), *haproxies_of(locals().get("config_file", "-"))]:
            try:
                leftover.kill()
            except psutil.NoSuchProcess:
                pass
