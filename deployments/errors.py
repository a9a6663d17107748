"""Errors a client's request can cause, each with its HTTP status, and how what a deployment
call raised maps to them.

They cross replica boundaries (Ray re-raises them in the caller), so each
keeps its message in ``args`` and pickles cleanly. No FastAPI here: the Python
client imports this module (the HTTP mapping is ``deployments.http_errors``).
"""

from __future__ import annotations

from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException


class EmbeddingRequestError(Exception):
    """A request the cluster refuses; ``status_code`` is the HTTP status."""

    status_code = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)

    @property
    def message(self) -> str:
        return str(self.args[0])


class BadRequestError(EmbeddingRequestError, ValueError):
    """Malformed or invalid input (400)."""


class UnknownModelError(EmbeddingRequestError, LookupError):
    """The request names a model the cluster does not serve (404)."""

    status_code = 404
    error_type = "model_not_found"


class PayloadTooLargeError(EmbeddingRequestError):
    """Too many inputs, or inputs too long (413)."""

    status_code = 413
    error_type = "payload_too_large"


class UnauthorizedError(EmbeddingRequestError):
    """Missing or wrong API key (401)."""

    status_code = 401
    error_type = "authentication_error"


class OverloadedError(EmbeddingRequestError):
    """The cluster is at capacity; retry later (503)."""

    status_code = 503
    error_type = "overloaded"


class ReplicaFailedError(OverloadedError):
    """A replica died while answering, twice; Serve is replacing it (503)."""

    error_type = "replica_failed"


class ModelLoadError(RuntimeError):
    """A served model could not be loaded on a replica: one line that says which and why."""


#: What a deployment call raises when the replica answering it died.
REPLICA_DEATHS = (RayActorError, ActorUnavailableError)


def cause_of(error: BaseException) -> BaseException:
    """The exception a replica raised, without Ray's wrapping (and its traceback text)."""
    while isinstance(error, RayTaskError) and error.cause is not None and error.cause is not error:
        error = error.cause
    return error


def as_request_error(error: BaseException) -> EmbeddingRequestError | None:
    """Map what a deployment call raised to the client's error, or ``None`` for a server fault."""
    error = cause_of(error)
    if isinstance(error, EmbeddingRequestError):
        return type(error)(error.message)
    if isinstance(error, (BackPressureError, DeploymentUnavailableError)):
        return OverloadedError("the cluster is at capacity; retry shortly")
    if isinstance(error, RayServeException) and isinstance(error.__cause__, REPLICA_DEATHS):
        error = error.__cause__  # the tokenizer replica died before the encoder call could start
    if isinstance(error, REPLICA_DEATHS):
        return ReplicaFailedError("a replica failed while answering and is being replaced; retry shortly")
    return None
