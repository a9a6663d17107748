"""Joining a cluster under Ray's token authentication (against a stand-in GCS that checks the
token as Ray's does), and the Kubernetes files: the RayService manifest against KubeRay's CRD
schema and Ray Serve's schema, the Dockerfile against the Ray it pins.

The real thing, a two-node Ray cluster with the default token auth, is tests/cluster/test_multinode.py."""

from __future__ import annotations

import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
import ray
import yaml
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from cluster import EmbeddingClient, app, ray_connect
from cluster.cli import main
from cluster.config import load_config
from cluster.ray_connect import GCS_PROBE_METHOD, ClusterAuthError, join_ray

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "examples" / "kuberay-rayservice.yaml"
CRD = REPO / "tests" / "data" / "kuberay" / "ray.io_rayservices.yaml"
REJECTION = "InvalidAuthToken: Authentication token is missing or incorrect"  # what Ray's GCS answers


class _StandInGcs(grpc.GenericRpcHandler):
    """Answers the probe's call as Ray's GCS does: with the cluster id, or, when it has a token
    and the call does not carry it as ``authorization: Bearer TOKEN``, ``UNAUTHENTICATED``."""

    def __init__(self, token: str | None) -> None:
        self.token = token

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if details.method != GCS_PROBE_METHOD:
            return None
        return grpc.unary_unary_rpc_method_handler(self._answer)

    def _answer(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        if self.token and dict(context.invocation_metadata()).get("authorization") != f"Bearer {self.token}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, REJECTION)
        return b"\x0a\x1ccluster-id"


@pytest.fixture
def gcs():
    """A function: a stand-in GCS wanting ``token`` (``None``: no auth), and its address."""
    servers = []

    def start(token: str | None) -> str:
        server = grpc.server(ThreadPoolExecutor(max_workers=2))
        server.add_generic_rpc_handlers((_StandInGcs(token),))
        port = server.add_insecure_port("0.0.0.0:0")  # Ray resolves 127.0.0.1 to this node's address
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(grace=None)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh HOME with no token, and none of Ray's auth variables set."""
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def joins(monkeypatch) -> list[dict[str, Any]]:
    """What ``join_ray`` did instead of joining: each ``ray.init`` and token-mode switch, in order."""
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(ray_connect, "_use_token_mode", lambda: calls.append({"token_mode": True}))
    monkeypatch.setattr(ray_connect.ray, "init", lambda **kwargs: calls.append({"init": kwargs}))
    return calls


def _write_token(path: Path, token: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(token + "\n")
    return path


def test_a_cluster_without_auth_is_joined_as_it_is(home, gcs, joins):
    _write_token(home / ".ray" / "auth_token", "unused")
    address = gcs(None)
    join_ray(address, namespace="n")
    assert joins == [{"init": {"address": address, "namespace": "n"}}]


@pytest.mark.parametrize("where", ["default", "path", "env"])
def test_the_token_ray_keeps_is_used_when_no_mode_was_chosen(where, home, gcs, joins, monkeypatch, tmp_path):
    token = secrets.token_hex(16)
    if where == "default":
        _write_token(home / ".ray" / "auth_token", token)
    elif where == "path":
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(_write_token(tmp_path / "copied-token", token)))
    else:
        monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    address = gcs(token)
    join_ray(address)
    assert joins == [{"token_mode": True}, {"init": {"address": address}}]


def test_a_chosen_token_mode_is_left_as_it_is(home, gcs, joins, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    _write_token(home / ".ray" / "auth_token", "t0ken")
    address = gcs("t0ken")
    join_ray(address)
    assert joins == [{"init": {"address": address}}]


def _one_line(error: ClusterAuthError) -> str:
    message = str(error)
    assert "\n" not in message
    return message


def test_a_missing_token_is_one_line_naming_where_ray_looks(home, gcs, joins):
    address = gcs("t0ken")
    with pytest.raises(ClusterAuthError) as raised:
        join_ray(address)
    message = _one_line(raised.value)
    assert "requires an auth token and there is none here" in message
    places = ("RAY_AUTH_TOKEN,", "RAY_AUTH_TOKEN_PATH", str(home / ".ray" / "auth_token"), "ray get-auth-token")
    assert all(place in message for place in places)
    assert joins == []


def test_auto_finds_the_cluster_as_ray_does(home, gcs, joins, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", gcs("t0ken"))
    with pytest.raises(ClusterAuthError, match="requires an auth token and there is none here"):
        join_ray("auto")
    assert joins == []


def test_a_wrong_token_is_rejected_naming_where_it_came_from(home, gcs, joins, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "stale")
    with pytest.raises(ClusterAuthError, match=r"rejected the auth token from RAY_AUTH_TOKEN: "):
        join_ray(gcs("t0ken"))
    assert joins == []


def test_auth_turned_off_here_against_a_cluster_that_wants_it(home, gcs, joins, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    _write_token(home / ".ray" / "auth_token", "t0ken")
    with pytest.raises(ClusterAuthError, match=r"requires an auth token but RAY_AUTH_MODE=disabled here: unset"):
        join_ray(gcs("t0ken"))
    assert joins == []


def test_a_token_path_that_names_no_file(home, gcs, joins, monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(ClusterAuthError, match=rf"RAY_AUTH_TOKEN_PATH={tmp_path / 'missing'} cannot be read"):
        join_ray(gcs("t0ken"))


def test_a_gcs_that_does_not_answer_and_a_local_cluster_are_left_to_ray(home, joins, free_port):
    address = f"127.0.0.1:{free_port()}"
    join_ray(address)
    join_ray("local", num_cpus=1)
    assert joins == [{"init": {"address": address}}, {"init": {"address": "local", "num_cpus": 1}}]


@pytest.mark.parametrize("command", [["serve"], ["embed", "in.jsonl", "out"]])
def test_the_cli_exits_2_at_once_with_one_line(command, home, gcs, capsys):
    address = gcs("t0ken")
    started = time.monotonic()
    assert main([*command, "--address", address]) == 2
    assert time.monotonic() - started < 30  # not Ray's minute of retries
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"embedding-cluster {command[0]}: the Ray cluster at ")
    assert "RAY_AUTH_TOKEN" in line and str(home / ".ray" / "auth_token") in line


def test_the_client_raises_the_same_error(home, gcs, monkeypatch):
    monkeypatch.setattr("cluster.client.ray.is_initialized", lambda: False)
    with pytest.raises(ClusterAuthError, match="requires an auth token"):
        EmbeddingClient(address=gcs("t0ken"))


# --- Kubernetes: examples/kuberay-rayservice.yaml and the Dockerfile ------------------------------


def _manifest() -> dict[str, dict]:
    return {document["kind"]: document for document in yaml.safe_load_all(MANIFEST.read_text())}


def _strict(schema: Any) -> Any:
    """The CRD's schema refusing fields it does not name, as ``kubectl apply`` does (strict field
    validation; without it the API server drops them without a word)."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(value) for value in schema]
    return schema


def test_the_rayservice_is_valid_against_kuberays_crd():
    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    service = _manifest()["RayService"]
    group, version = service["apiVersion"].split("/")
    assert (crd["spec"]["group"], crd["spec"]["names"]["kind"]) == (group, "RayService")
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    validator = jsonschema.Draft7Validator(_strict(served["schema"]["openAPIV3Schema"]))
    assert [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(service)] == []
    # the schema is not everything: a misspelt field must fail, so that passing means something
    broken = yaml.safe_load(yaml.safe_dump(service).replace("workerGroupSpecs", "workerGroupSpec"))
    assert not validator.is_valid(broken)


def test_the_rayservice_passes_kuberays_own_checks():
    """The checks of KubeRay's ValidateRayServiceSpec (v1.7.0) that this manifest could fail."""
    spec = _manifest()["RayService"]["spec"]["rayClusterConfig"]
    assert spec["authOptions"] == {"mode": "token", "secretName": "embedding-cluster-ray-token"}
    assert tuple(map(int, spec["rayVersion"].split("."))) >= (2, 52, 0)  # token auth needs Ray 2.52
    assert "headService" not in spec["headGroupSpec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        assert group["template"]["spec"]["containers"], "every group needs a container"
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert len({group["groupName"] for group in spec["workerGroupSpecs"]}) == len(spec["workerGroupSpecs"])
    names = [_manifest()[kind]["metadata"]["name"] for kind in ("ConfigMap", "RayService")]
    assert all(re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) for name in names)
    # the Secret is made by hand, as the header says; KubeRay reads its auth_token key
    assert f"kubectl create secret generic {spec['authOptions']['secretName']} --from-literal=auth_token=" in (
        MANIFEST.read_text())


def test_the_pods_require_the_api_key_and_run_unprivileged():
    """The API listens on 0.0.0.0 in the pods: its key Secret is required (no optional), and every Ray
    container runs as a non-root user on a read-only root filesystem with /tmp writable."""
    spec = _manifest()["RayService"]["spec"]["rayClusterConfig"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        (container,) = pod["containers"]
        (key,) = [e for e in container["env"] if e["name"] == "EMBEDDING_CLUSTER_API_KEY"]
        assert not key["valueFrom"]["secretKeyRef"].get("optional", False)
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert {"name": tmp["name"], "emptyDir": {}} in pod["volumes"]
    assert "kubectl create secret generic embedding-cluster-api-key --from-literal=api_key=" in MANIFEST.read_text()


def test_serve_config_v2_passes_serves_schema_and_builds_the_app(tmp_path):
    manifest = _manifest()
    serve_config = yaml.safe_load(manifest["RayService"]["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    (application,) = serve_config["applications"]
    module, attribute = application["import_path"].split(":")
    assert (module, attribute) == ("cluster.app", "app_builder")
    # the app builder's config is the ConfigMap, mounted where args.config says in every Ray pod
    config_path = Path(application["args"]["config"])
    spec = manifest["RayService"]["spec"]["rayClusterConfig"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["configMap"]["name"] == manifest["ConfigMap"]["metadata"]["name"]
    local = tmp_path / config_path.name
    local.write_text(manifest["ConfigMap"]["data"][config_path.name])
    assert isinstance(app.app_builder({"config": str(local)}), Application)
    # the encoders take a GPU, and the worker group has them
    gpus = {model.name: model.deployment_options()["ray_actor_options"]["num_gpus"]
            for model in load_config(local).models}
    assert gpus == {"all-MiniLM-L6-v2": 1}
    (worker,) = spec["workerGroupSpecs"]
    assert int(worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def test_the_image_is_the_ray_this_project_runs():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={ray.__version__}\n" in dockerfile
    assert "FROM rayproject/ray:${RAY_VERSION}-py311-${CUDA}\n" in dockerfile
    assert dockerfile.count("-c constraints.txt") == 2  # torch's pin, for torch and for the project
    spec = _manifest()["RayService"]["spec"]["rayClusterConfig"]
    assert spec["rayVersion"] == ray.__version__
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        image = group["template"]["spec"]["containers"][0]["image"]
        assert image.endswith(f"/embedding-cluster:{ray.__version__}-cu128")
