"""The one place where errors become HTTP: a status per error type, one JSON body shape.

Every error answer is ``{"error": <type>, "message": <what to change>, "request_id": ...}``
(validation errors add ``details``), and ``error_responses`` documents the same shape,
with an example, for each status a route can return. An error after a streamed answer
began is the same body in the stream's ``error`` event (``error_body``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app.errors import (
    DeadlineExceeded,
    Forbidden,
    InferenceFailed,
    InputTooLarge,
    InvalidInput,
    ModelNotFound,
    ModelUnavailable,
    Overloaded,
    ServiceError,
    Unauthorized,
    WrongTask,
)

log = logging.getLogger(__name__)

# nginx's code for a request whose client closed the connection before the answer: what the
# access log and the metrics record for it (nobody is there to read a response).
CLIENT_CLOSED_REQUEST = 499


class ClientLeft(Exception):
    """The client hung up before its answer; its work was dropped (app/api/calls.py)."""


STATUS: dict[type[ServiceError], int] = {
    WrongTask: 400,
    Unauthorized: 401,
    Forbidden: 403,
    ModelNotFound: 404,
    InputTooLarge: 413,
    InvalidInput: 422,
    Overloaded: 429,
    InferenceFailed: 500,
    ModelUnavailable: 503,
    DeadlineExceeded: 504,
}


class ErrorBody(BaseModel):
    error: str = Field(description="Machine-readable error type.")
    message: str = Field(description="What went wrong and what to change.")
    request_id: str | None = Field(None, description="Quote it when reporting a problem (X-Request-ID).")
    details: list[dict[str, Any]] | None = Field(None, description="Validation errors, one per field.")


_EXAMPLES: dict[int, tuple[str, str, str]] = {
    400: (
        "Wrong task",
        "wrong_task",
        "model 'opus-mt-en-de' serves translation, not /classify; use one of: distilbert-sst2, minilm-sentiment",
    ),
    401: (
        "Missing or wrong API key",
        "unauthorized",
        "missing or invalid API key; send 'Authorization: Bearer <key>'",
    ),
    403: (
        "Key without the scope this needs",
        "forbidden",
        "loading and unloading models needs an admin key (TESSERA_ADMIN_KEYS); this key is an inference key",
    ),
    404: (
        "Unknown model",
        "model_not_found",
        "unknown model 'bert-x'; models for /classify: distilbert-sst2, minilm-sentiment",
    ),
    413: (
        "Input too large",
        "input_too_large",
        "input 0 has 250000 characters; the limit is 100000 (TESSERA_MAX_CHARS_PER_INPUT)",
    ),
    422: ("Invalid request", "invalid_input", "inputs: String should have at least 1 character"),
    429: (
        "Queue full",
        "overloaded",
        "model 'minilm' has 4096 inputs queued (limit 4096); retry later or send fewer inputs at once",
    ),
    500: ("Inference failed", "inference_failed", "inference failed on model 'minilm': RuntimeError: ..."),
    503: (
        "Model unavailable",
        "model_unavailable",
        "model 'opus-mt-en-de' comes from the Hugging Face hub ('Helsinki-NLP/opus-mt-en-de'), is not in the "
        "local cache, and this server cannot reach the hub (offline). To serve it: ...",
    ),
    504: (
        "Deadline exceeded",
        "deadline_exceeded",
        "the request did not finish within its deadline on model 'minilm'; raise timeout_s or send fewer inputs",
    ),
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the given statuses, each with the shared body and an example."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        summary, code, message = _EXAMPLES[status]
        headers = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}
        out[status] = {
            "model": ErrorBody,
            "description": summary,
            "content": {
                "application/json": {"example": {"error": code, "message": message, "request_id": "3f1c2a9e8b7d4c65"}}
            },
            **({"headers": headers} if status in (429, 503) else {}),
        }
    return out


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


class ErrorJSONResponse(JSONResponse):
    """JSON that survives whatever a client sent: a message may quote a client's string, and a
    lone surrogate in it (valid in JSON, not in UTF-8) is written as the JSON escape it came as."""

    def render(self, content: Any) -> bytes:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.encode("utf-8", "backslashreplace")


def error_response(
    request: Request,
    status: int,
    code: str,
    message: str,
    *,
    retry_after: float | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body = ErrorBody(error=code, message=message, request_id=request_id_of(request), **extra)
    sent = dict(headers or {})
    if retry_after is not None:
        sent["Retry-After"] = str(max(1, round(retry_after)))
    if status == 401:
        sent["WWW-Authenticate"] = 'Bearer realm="tessera"'
    return ErrorJSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=sent)


UNEXPECTED = "the server failed unexpectedly; the request id is in the log"


def error_body(request: Request, exc: Exception) -> dict[str, Any]:
    """The body an error answers with, for one that comes once an answer has begun (a
    streamed one's ``error`` event), where no status can be sent any more."""
    if isinstance(exc, ServiceError):
        code, message = exc.code, exc.message
    else:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        code, message = "internal_error", UNEXPECTED
    return ErrorBody(error=code, message=message, request_id=request_id_of(request)).model_dump(exclude_none=True)


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route answers on this path (RFC 9110: a 405 lists them in Allow),
    found by asking the app's routes whether they fully match the path with each method."""
    routes = request.app.router.routes
    return [
        method
        for method in HTTP_METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)
    ]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        status = next((s for cls, s in STATUS.items() if isinstance(exc, cls)), 500)
        retry_after = exc.retry_after if status in (429, 503) else None
        if retry_after is None and status == 429:
            retry_after = 1
        return error_response(request, status, exc.code, exc.message, retry_after=retry_after)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {
                "field": ".".join(str(p) for p in err["loc"] if p != "body"),
                "message": err["msg"],
                "type": err["type"],
            }
            for err in exc.errors()
        ]
        message = "; ".join(f"{d['field'] or 'body'}: {d['message']}" for d in details)
        return error_response(request, 422, "invalid_input", message, details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status, message, headers = exc.status_code, str(exc.detail), dict(exc.headers or {})
        if status == 405:
            allowed = allowed_methods(request)
            headers["Allow"] = ", ".join(allowed)
            message = f"{request.method} is not allowed on {request.url.path}; allowed: {', '.join(allowed)}"
        elif status == 400 and exc.__cause__ is not None:
            # FastAPI's "There was an error parsing the body": undecodable bytes, or nesting too deep.
            cause = exc.__cause__
            message = f"the body could not be parsed ({type(cause).__name__}); send UTF-8 JSON of ordinary depth"
        code = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed", 413: "input_too_large"}.get(
            status, "http_error"
        )
        return error_response(request, status, code, message, headers=headers)

    @app.exception_handler(ClientLeft)
    async def _client_left(request: Request, exc: ClientLeft) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # the server sends it nowhere

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request, 500, "internal_error", UNEXPECTED)
