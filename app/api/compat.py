"""What the compatibility routes share: error answers a foreign client can read.

``app.api.compat_hf`` (the Hugging Face Inference API) and ``app.api.compat_openai``
(OpenAI embeddings) reuse the task routes' request path; only their wire shapes differ.
Their errors are still made by the one mapping in ``app.api.errors``; a route class
then reshapes that answer where a client would otherwise drop our message:
huggingface_hub reads the ``X-Error-Message`` header, the openai client only
``{"error": {"message": ...}}``.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from app.api.errors import ErrorJSONResponse
from app.api.json_route import JsonBodyRoute


async def project_error_response(request: Request, exc: Exception) -> Response:
    """The answer the app's own exception handlers (``app.api.errors``) give for ``exc``."""
    handlers = request.app.exception_handlers
    handler = next((handlers[cls] for cls in type(exc).__mro__ if cls in handlers), None)
    if handler is None:
        raise exc
    response = handler(request, exc)
    if inspect.isawaitable(response):
        response = await response
    return response


class ReshapedErrorsRoute(JsonBodyRoute):
    """An APIRoute whose error answers pass through ``reshape`` (request validation included)."""

    def reshape(self, response: Response) -> Response:
        return response

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return self.reshape(await project_error_response(request, exc))

        return handle


def error_body(response: Response) -> dict[str, Any]:
    """The ``{"error", "message", "request_id"}`` body of one of our error answers."""
    try:
        body = json.loads(bytes(response.body))
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def copy_headers(response: Response) -> dict[str, str]:
    """Headers worth keeping when the body is rebuilt (Retry-After, WWW-Authenticate ...)."""
    return {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}


def with_body(response: Response, body: dict[str, Any]) -> JSONResponse:
    # ErrorJSONResponse: the rebuilt message may quote a client's lone surrogate, as ours do.
    return ErrorJSONResponse(body, status_code=response.status_code, headers=copy_headers(response))
