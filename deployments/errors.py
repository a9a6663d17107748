"""Errors a client's request can cause, each with its HTTP status.

They cross replica boundaries (Ray re-raises them in the caller), so each
keeps its message in ``args`` and pickles cleanly.
"""

from __future__ import annotations


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
