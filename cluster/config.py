"""``ClusterConfig``: the whole cluster in one pydantic model, loadable from YAML."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.front import Front
from deployments.settings import (
    IngressSettings,
    LimitsSettings,
    ModelConfig,
    ReplicaSettings,
    ServingSettings,
    TokenizerSettings,
)

if TYPE_CHECKING:
    from ray.serve.config import gRPCOptions

logger = logging.getLogger(__name__)

API_KEY_ENV = "EMBEDDING_CLUSTER_API_KEY"

__all__ = ["ClusterConfig", "GRPCConfig", "HTTPConfig", "IngressSettings", "LimitsSettings", "ModelConfig",
           "TokenizerSettings", "load_config"]


class HTTPConfig(BaseModel):
    """Where HTTP is served. 127.0.0.1 by default: binding 0.0.0.0 exposes the API."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    front: Front = Field("auto", description="What takes the HTTP port of a cluster `serve` starts itself: "
                                             "'haproxy' (Ray Serve's HAProxy ingress, straight to the ingress "
                                             "replicas), 'proxy' (Serve's Python proxy actor), 'auto' (HAProxy when "
                                             "its binary is installed, as ray[serve] installs it on Linux).")


class GRPCConfig(BaseModel):
    """Hugging Face TEI's gRPC API (``tei.v1``: Info, Embed, Rerank; ``deployments.grpc_service``), off
    unless a port is set: Serve's Python proxy takes the port, or HAProxy's gRPC frontend under the
    HAProxy front. Ray binds its gRPC listeners on every interface whatever ``http.host`` (``serve``
    refuses that beside a loopback HTTP host without an API key)."""

    model_config = ConfigDict(extra="forbid")

    port: int | None = Field(None, ge=1, le=65535, description="The gRPC port; null: no gRPC.")

    def serve_options(self) -> gRPCOptions | None:
        """Serve's ``grpc_options`` for ``serve.start`` (every TEI service registered), ``None`` when off."""
        if self.port is None:
            return None
        from ray.serve.config import gRPCOptions

        from deployments.protos import SERVICER_FUNCTIONS

        return gRPCOptions(port=self.port, grpc_servicer_functions=SERVICER_FUNCTIONS)


class ClusterConfig(BaseModel):
    """Models to serve, and how the tokenizer, the ingress and HTTP run."""

    model_config = ConfigDict(extra="forbid")

    app_name: str = "embeddings"
    route_prefix: str = "/"
    http: HTTPConfig = Field(default_factory=HTTPConfig)
    grpc: GRPCConfig = Field(default_factory=GRPCConfig)
    tokenizer: TokenizerSettings = Field(default_factory=TokenizerSettings)
    ingress: IngressSettings = Field(default_factory=IngressSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    api_key: str | None = Field(None, description="Require 'Authorization: Bearer <key>' on every route "
                                                  "but /health and /ready. The environment's "
                                                  "EMBEDDING_CLUSTER_API_KEY overrides it, and serve's "
                                                  "--api-key overrides both.")
    models: list[ModelConfig] = Field(default_factory=lambda: [ModelConfig()])

    @model_validator(mode="after")
    def _check_models(self) -> "ClusterConfig":
        self.serving()
        return self

    def serving(self) -> ServingSettings:
        """The part of the config the ingress needs."""
        return ServingSettings(models=self.models, limits=self.limits, ingress=self.ingress, api_key=self.api_key)

    def with_api_key(self, flag: str | None = None) -> "ClusterConfig":
        """The config with the API key that applies: ``flag`` (``serve --api-key``), else the
        environment's ``EMBEDDING_CLUSTER_API_KEY``, else the config's own: one rule for ``serve``,
        ``serve run``/``serve deploy`` and the app builder."""
        for source, value in ((f"{API_KEY_ENV} (the environment)", os.environ.get(API_KEY_ENV)), ("--api-key", flag)):
            if value is not None and not value.strip():
                raise ValueError(f"{source} is empty, which would turn access control off without a word: set a "
                                 f"key, or leave it unset to serve without one")
        api_key = flag or os.environ.get(API_KEY_ENV) or self.api_key
        return self if api_key == self.api_key else self.model_copy(update={"api_key": api_key})

    def resolved(self) -> "ClusterConfig":
        """Every model with the settings its folder decides made explicit (``ModelConfig.resolved``);
        ``ValueError`` naming the model and the folder for a model that cannot be served."""
        return self.model_copy(update={"models": [model.resolved() for model in self.models]})

    def model(self, name: str) -> ModelConfig:
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(f"no model named {name!r} in the config; it has {[m.name for m in self.models]}")

    def fit_local_cpus(self, cpus: float) -> "ClusterConfig":
        """The config for a cluster that is this one machine of ``cpus`` CPUs, where every deployment's
        first replicas (``autoscaling.min_replicas``) must be placed, or a model is never ready. When
        they ask for more than there is, the CPU models that leave ``num_cpus`` unset share what the
        tokenizer, the ingress and the other models leave, equally; ``ValueError`` naming the CPUs
        asked and available, and the settings to change, when even that cannot fit."""
        def starting(settings: ReplicaSettings) -> float:
            return settings.num_cpus * settings.autoscaling.min_replicas

        shared = [m for m in self.models if "num_cpus" not in m.model_fields_set and m.num_gpus == 0]
        fixed = starting(self.tokenizer) + starting(self.ingress) + sum(
            starting(m) for m in self.models if m not in shared)
        asked = fixed + sum(starting(m) for m in shared)
        if asked <= cpus + 1e-9:
            return self
        replicas = sum(m.autoscaling.min_replicas for m in shared)
        share = math.floor(100 * (cpus - fixed) / replicas) / 100 if replicas else 0.0
        if share >= 0.01:
            logger.info("%d model(s) share %.2f CPUs: num_cpus %.2f per replica (set num_cpus to choose)",
                        len(shared), cpus - fixed, share)
            models = [m.model_copy(update={"num_cpus": share}) if m in shared else m for m in self.models]
            return self.model_copy(update={"models": models})
        parts = [f"tokenizer {starting(self.tokenizer):g}", f"ingress {starting(self.ingress):g}",
                 *(f"model {m.name!r} {starting(m):g}" for m in self.models)]
        raise ValueError(f"the deployments ask for {asked:g} CPUs to start ({', '.join(parts)}) and this machine has "
                         f"{cpus:g}: lower num_cpus (or autoscaling.min_replicas) of the models, tokenizer or "
                         "ingress in the config, or serve fewer models")

    def with_local_threads(self, cpus: int) -> "ClusterConfig":
        """The config for a cluster that is this one machine: CPU models that do not set
        ``torch_threads`` share its ``cpus`` cores among their most replicas (the tokenizer
        and the ingress use a few percent), instead of one thread per logical ``num_cpus``."""
        cpu_models = [m for m in self.models if m.num_gpus == 0 and m.torch_threads is None]
        replicas = sum(m.autoscaling.max_replicas for m in cpu_models)
        if not replicas:
            return self
        threads = max(1, cpus // replicas)
        models = [m.model_copy(update={"torch_threads": threads}) if m in cpu_models else m for m in self.models]
        return self.model_copy(update={"models": models})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "ClusterConfig":
        return cls.model_validate(yaml.safe_load(text) or {})


def load_config(source: str | Path | dict[str, Any] | ClusterConfig | None = None) -> ClusterConfig:
    """A config from a YAML file, a dict, or the default (``None``)."""
    if source is None:
        return ClusterConfig()
    if isinstance(source, ClusterConfig):
        return source
    if isinstance(source, dict):
        return ClusterConfig.model_validate(source)
    return ClusterConfig.from_yaml(Path(source).read_text())
