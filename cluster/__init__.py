"""The cluster: config, the Serve app, the Python client, the CLI."""

from cluster.client import Chunk, EmbeddingClient, Ranked
from cluster.config import ClusterConfig, ModelConfig, load_config
from deployments.errors import (
    BadRequestError,
    EmbeddingRequestError,
    OverloadedError,
    PayloadTooLargeError,
    UnknownModelError,
)

__all__ = [
    "BadRequestError",
    "Chunk",
    "ClusterConfig",
    "EmbeddingClient",
    "EmbeddingRequestError",
    "ModelConfig",
    "OverloadedError",
    "PayloadTooLargeError",
    "Ranked",
    "UnknownModelError",
    "load_config",
]
