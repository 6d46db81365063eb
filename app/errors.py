"""Domain errors: what went wrong, in words a client can act on.

Raised anywhere below the API layer; ``app.api.errors`` maps each type to one HTTP
status and one JSON body shape. Nothing here knows about HTTP.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error the service reports to a client."""

    code = "error"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class ModelNotFound(ServiceError):
    code = "model_not_found"


class WrongTask(ServiceError):
    code = "wrong_task"


class InvalidInput(ServiceError):
    code = "invalid_input"


class InputTooLarge(ServiceError):
    code = "input_too_large"


class ModelUnavailable(ServiceError):
    """The model cannot be served now: loading failed, not available offline, out of memory."""

    code = "model_unavailable"


class Overloaded(ServiceError):
    code = "overloaded"


class DeadlineExceeded(ServiceError):
    code = "deadline_exceeded"


class InferenceFailed(ServiceError):
    """An unexpected failure inside a forward pass; the server's fault, not the client's."""

    code = "inference_failed"


class Unauthorized(ServiceError):
    code = "unauthorized"


class Forbidden(ServiceError):
    """A valid key without the scope this needs (an inference key asking to load a model)."""

    code = "forbidden"
