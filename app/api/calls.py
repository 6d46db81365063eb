"""How a route calls the service: find it on the app, drop the work if the client hangs up,
and leave the answer's accounting (model, inputs, largest batch) on the request for the
access log and the metrics (app/api/middleware.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import Request

from app.api.errors import ClientLeft, error_responses
from app.api.security import tenant_of
from app.registry.slots import Models
from app.service.requests import Answer
from app.service.service import InferenceService

T = TypeVar("T")

TASK_ERRORS = error_responses(400, 401, 404, 413, 422, 429, 500, 503, 504)


def registry_of(request: Request) -> Models:
    registry: Models = request.app.state.registry
    return registry


def service_of(request: Request) -> InferenceService:
    service: InferenceService = request.app.state.service
    return service


async def call(request: Request, work: Awaitable[Answer[T]]) -> Answer[T]:
    """The service's answer to ``work``, cancelled if the client goes away first."""
    answer = await until_disconnect(request, work)
    account(request, answer)
    return answer


def account(request: Request, answer: Answer[Any]) -> None:
    """What the access log and the metrics say of the request's answer."""
    state: Any = request.state
    state.model, state.inputs, state.batch_size = answer.model, answer.inputs, answer.batch_size


def tenant(request: Request) -> str:
    return tenant_of(request)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client goes away first (then ClientLeft: the
    access log and the metrics record 499, not a server error)."""
    request_task = asyncio.current_task()
    assert request_task is not None
    left = False

    async def watch() -> None:
        nonlocal left
        # The body has been read: what the server says next is that the client left.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        left = True
        request_task.cancel()  # the client is gone: so is its work

    watcher = asyncio.create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not left:
            raise  # cancelled for another reason (the server stopping): it stays cancelled
        request_task.uncancel()
        raise ClientLeft() from None
    finally:
        watcher.cancel()
