"""Joining a running Ray cluster with the token authentication it asks for.

Ray guards a cluster with a shared token when it runs with ``RAY_AUTH_MODE=token``; ``ray start
--head`` turns that on by itself when a token exists (``~/.ray/auth_token``), and so does a new
local ``ray.init()``. A process that joins an explicit address, though, sends the token only when
its own environment says ``RAY_AUTH_MODE=token`` before ``import ray`` (Ray reads the variable
once, then); without it ``ray.init`` retries an ``Unauthenticated`` GCS for a minute.
``join_ray`` asks the GCS first, in one quick call: when it wants a token and the user has not
chosen a mode, the token Ray would use (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``,
``~/.ray/auth_token``) is turned on for this process as Ray does for its own local clusters;
when there is none, or the GCS rejects it, ``ClusterAuthError`` says so in one line.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import grpc
import ray

logger = logging.getLogger(__name__)

AUTH_MODE_VAR = "RAY_AUTH_MODE"
TOKEN_VAR = "RAY_AUTH_TOKEN"
TOKEN_PATH_VAR = "RAY_AUTH_TOKEN_PATH"
# every GCS call is checked for the token; this one takes an empty request
GCS_PROBE_METHOD = "/ray.rpc.NodeInfoGcsService/GetClusterId"
PROBE_TIMEOUT_S = 10.0


class ClusterAuthError(ConnectionError):
    """The cluster wants a token that this process does not have, or rejects the one it has."""


def default_token_path() -> Path:
    """Where Ray writes and looks for the token: ``~/.ray/auth_token``."""
    return Path.home() / ".ray" / "auth_token"


def _how_to_pass() -> str:
    return (f"copy the head node's ~/.ray/auth_token to {default_token_path()}, or point {TOKEN_PATH_VAR} at a "
            f"copy, or set {TOKEN_VAR} to it (`ray get-auth-token` on the head prints it)")


def find_token() -> tuple[str, str] | None:
    """The token Ray would send and where it is, in Ray's order: ``RAY_AUTH_TOKEN``, the file
    ``RAY_AUTH_TOKEN_PATH`` names (which must hold one), ``~/.ray/auth_token``; ``None`` if none."""
    if token := os.environ.get(TOKEN_VAR, "").strip():
        return token, TOKEN_VAR
    if path := os.environ.get(TOKEN_PATH_VAR):
        try:
            token = Path(path).read_text().strip()
        except OSError as error:
            raise ClusterAuthError(f"{TOKEN_PATH_VAR}={path} cannot be read ({error.strerror}): "
                                   f"{_how_to_pass()}") from None
        if not token:
            raise ClusterAuthError(f"{TOKEN_PATH_VAR}={path} is empty: {_how_to_pass()}")
        return token, f"{TOKEN_PATH_VAR}={path}"
    path = default_token_path()
    if path.is_file() and (token := path.read_text().strip()):
        return token, str(path)
    return None


def probe_gcs(address: str, token: str | None = None, timeout_s: float = PROBE_TIMEOUT_S) -> grpc.StatusCode:
    """How the GCS at ``address`` answers one call, sent with ``token`` (if any): ``OK``,
    ``UNAUTHENTICATED`` (it wants a token, or another one), or why it did not answer."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(address) as channel:
        try:
            channel.unary_unary(GCS_PROBE_METHOD)(b"", timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def _gcs_address(address: str) -> str | None:
    """The GCS that ``ray.init(address=address)`` joins (``"auto"`` resolved as Ray resolves it);
    ``None`` when it starts a cluster (``"local"``) or goes through Ray Client (``ray://``)."""
    if address == "local" or "://" in address:
        return None
    from ray._private.services import canonicalize_bootstrap_address

    return canonicalize_bootstrap_address(address)


def _use_token_mode() -> None:
    """Token authentication on for this process and those it starts, as Ray turns it on for a
    local cluster that finds a token: ``RAY_AUTH_MODE=token``, and Ray's config re-read."""
    from ray._private.authentication.authentication_token_setup import _enable_token_auth

    _enable_token_auth()


def prepare_auth(gcs_address: str) -> None:
    """Make this process send the token the GCS at ``gcs_address`` wants (``ClusterAuthError``
    when it wants one this process lacks or rejects the one it has). A GCS that does not answer
    is left to ``ray.init``, which reports it."""
    mode = os.environ.get(AUTH_MODE_VAR, "").strip().lower() or None
    if mode != "token":
        if probe_gcs(gcs_address) is not grpc.StatusCode.UNAUTHENTICATED:
            return
        if mode is not None:
            raise ClusterAuthError(f"the Ray cluster at {gcs_address} requires an auth token but {AUTH_MODE_VAR}="
                                   f"{mode} here: unset {AUTH_MODE_VAR} (or set it to token) and make the token "
                                   f"available: {_how_to_pass()}")
    found = find_token()
    if found is None:
        raise ClusterAuthError(f"the Ray cluster at {gcs_address} requires an auth token and there is none here "
                               f"({TOKEN_VAR}, {TOKEN_PATH_VAR} or {default_token_path()}): {_how_to_pass()}")
    token, source = found
    if probe_gcs(gcs_address, token) is grpc.StatusCode.UNAUTHENTICATED:
        raise ClusterAuthError(f"the Ray cluster at {gcs_address} rejected the auth token from {source}: "
                               f"use the head node's token instead: {_how_to_pass()}")
    if mode is None:
        logger.info("the Ray cluster at %s requires an auth token: using the one from %s", gcs_address, source)
        _use_token_mode()


def join_ray(address: str, **init_kwargs) -> None:
    """``ray.init(address=address, **init_kwargs)``, with the token the cluster asks for when
    ``address`` names one to join (HOST:PORT or ``"auto"``); ``"local"`` starts a cluster with
    Ray's default auth. ``ClusterAuthError`` in a second, instead of a minute of retries, when
    the cluster wants a token this process cannot send."""
    gcs_address = _gcs_address(address)
    if gcs_address is not None:
        prepare_auth(gcs_address)
    ray.init(address=address, **init_kwargs)
