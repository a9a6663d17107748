"""The Ray Serve application: a tokenizer, one encoder deployment per model, the ingress.

``serve run cluster.app:app_builder config=cluster.yaml`` (or ``serve build`` /
``serve deploy``) uses ``app_builder``; the CLI and the tests use ``build_app``.
"""

from __future__ import annotations

from ray.serve import Application

from cluster.config import ClusterConfig, load_config
from deployments.encoder import Encoder
from deployments.ingress import Ingress
from deployments.settings import deployment_name
from deployments.tokenizer import Tokenizer


def build_app(config: ClusterConfig | None = None) -> Application:
    """Bind the deployments of ``config`` (default: the bundled MiniLM) into one app.

    Each model's folder is read here (``ClusterConfig.resolved``), so a model that cannot be
    served stops the deployment with its reason before any replica starts."""
    config = (config or ClusterConfig()).resolved().with_api_key()
    tokenizer = Tokenizer.options(**config.tokenizer.deployment_options()).bind(config.models, config.limits)
    encoders = {
        model.name: Encoder.options(name=deployment_name(model.name), **model.deployment_options()).bind(model)
        for model in config.models
    }
    return Ingress.options(**config.ingress.deployment_options()).bind(config.serving(), tokenizer, encoders)


def app_builder(args: dict[str, str]) -> Application:
    """Serve's app-builder entry point: ``config=PATH`` names a YAML ClusterConfig
    (none: the default model)."""
    return build_app(load_config(args.get("config")))
