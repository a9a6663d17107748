"""The Ray Serve application: a tokenizer, one encoder deployment per model, the ingress.

``serve run cluster.app:app_builder config=cluster.yaml`` (or ``serve build`` /
``serve deploy``) uses ``app_builder``; the CLI and the tests use ``build_app``.
"""

from __future__ import annotations

import os
from typing import Any

from ray.serve import Application

from cluster.config import ClusterConfig, load_config
from deployments.encoder import Encoder
from deployments.ingress import Ingress, deployment_name
from deployments.settings import ModelConfig
from deployments.tokenizer import Tokenizer

API_KEY_ENV = "EMBEDDING_CLUSTER_API_KEY"


def _encoder(model: ModelConfig) -> Application:
    actor_options: dict[str, Any] = {"num_cpus": model.num_cpus, "num_gpus": model.num_gpus}
    if model.resources:
        actor_options["resources"] = dict(model.resources)
    return Encoder.options(
        name=deployment_name(model.name),
        ray_actor_options=actor_options,
        autoscaling_config=model.autoscaling.model_dump(exclude_unset=True),
        max_ongoing_requests=model.max_ongoing_requests,
        max_queued_requests=model.max_queued_requests,
    ).bind(model)


def build_app(config: ClusterConfig | None = None) -> Application:
    """Bind the deployments of ``config`` (default: the bundled MiniLM) into one app."""
    config = config or ClusterConfig()
    if config.api_key is None and os.environ.get(API_KEY_ENV):
        config = config.model_copy(update={"api_key": os.environ[API_KEY_ENV]})
    tokenizer = Tokenizer.options(
        ray_actor_options={"num_cpus": config.tokenizer.num_cpus},
        autoscaling_config=config.tokenizer.autoscaling.model_dump(exclude_unset=True),
        max_ongoing_requests=config.tokenizer.max_ongoing_requests,
        max_queued_requests=config.tokenizer.max_queued_requests,
    ).bind(config.models, config.limits)
    encoders = {model.name: _encoder(model) for model in config.models}
    return Ingress.options(
        ray_actor_options={"num_cpus": config.ingress.num_cpus},
        autoscaling_config=config.ingress.autoscaling.model_dump(exclude_unset=True),
        max_ongoing_requests=config.ingress.max_ongoing_requests,
        max_queued_requests=config.ingress.max_queued_requests,
    ).bind(config.serving(), tokenizer, encoders)


def app_builder(args: dict[str, str]) -> Application:
    """Serve's app-builder entry point: ``config=PATH`` names a YAML ClusterConfig
    (none: the default model)."""
    return build_app(load_config(args.get("config")))
