"""The one place where errors become HTTP: a status per error type, one JSON body shape.

Every error answer is ``{"error": <type>, "message": <what to change>, "request_id": ...}``
(validation errors add ``details``), and ``error_responses`` documents the same shape,
with an example, for each status a route can return.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import (
    DeadlineExceeded,
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

STATUS: dict[type[ServiceError], int] = {
    WrongTask: 400,
    Unauthorized: 401,
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


def error_response(
    request: Request, status: int, code: str, message: str, *, retry_after: float | None = None, **extra: Any
) -> JSONResponse:
    body = ErrorBody(error=code, message=message, request_id=request_id_of(request), **extra)
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="tessera"'
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


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
        code = {404: "not_found", 405: "method_not_allowed", 413: "input_too_large"}.get(exc.status_code, "http_error")
        return error_response(request, exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(
            request, 500, "internal_error", "the server failed unexpectedly; the request id is in the log"
        )
