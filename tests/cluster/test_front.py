"""The HTTP front (``cluster.front``): HAProxy when its binary is there, its extra listeners on loopback."""

from __future__ import annotations

import subprocess

import psutil
import pytest

from cluster import front
from cluster.front import front_environment, haproxy_binary, loopback_wrapper

RAY_HAPROXY_CONFIG = """global
    maxconn 4096
frontend http_frontend
    bind 127.0.0.1:8000
frontend prometheus
    bind :9101
listen stats
  bind *:8404
  stats enable
"""


def test_the_wrapper_binds_the_side_listeners_to_loopback(tmp_path):
    """The wrapper rewrites the config after ``-f`` as Ray writes it, then runs the binary with the same
    arguments (here ``echo``, which prints them)."""
    config = tmp_path / "haproxy.cfg"
    config.write_text(RAY_HAPROXY_CONFIG)
    wrapper = loopback_wrapper("echo", tmp_path)
    done = subprocess.run([str(wrapper), "-db", "-f", str(config), "-sf", "123"], capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == ["-db", "-f", str(config), "-sf", "123"]
    rewritten = config.read_text()
    assert "    bind 127.0.0.1:9101\n" in rewritten and "  bind 127.0.0.1:8404\n" in rewritten
    assert "    bind 127.0.0.1:8000\n" in rewritten and "*:" not in rewritten


def test_front_environment(monkeypatch):
    for name in ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_HAPROXY_BINARY_PATH", *front.SIDE_PORTS):
        monkeypatch.delenv(name, raising=False)
    assert front_environment("proxy") == {}
    with pytest.raises(ValueError, match="front must be one of"):
        front_environment("nginx")
    if haproxy_binary() is not None:
        environment = front_environment("auto")
        assert environment["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
        assert all(int(environment[name]) > 0 for name in front.SIDE_PORTS)
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
