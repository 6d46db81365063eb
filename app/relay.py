"""One HTTP request carried whole from a front to a replica, and answered there in-process.

On Ray Serve (app/ray_serve.py) the HTTP front is a gateway deployment and the models live
in replica deployments. The gateway reads a request into an ``HTTPCall`` (plain data, so it
crosses processes), a replica runs it through its own Tessera app with ``answer`` and gives
back status, headers and body. Because the request is whole on the gateway's side, the
gateway can send it again to another replica when the one it chose died under it; every
Tessera route can be replayed (inference computes, load and unload converge). A request
that asks for a streamed answer (``streams``) is answered as it comes instead
(``answer_stream``: its head, then each piece of its body), and can be sent again only
until its head came.

Traced (app/tracing.py), the call carries the context of the gateway's span as its
``traceparent`` (``under``), and the answer names the gateway's span (``naming``).

Nothing here imports Ray.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import Span

from app import tracing

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class HTTPCall:
    method: str
    path: str
    query: bytes
    headers: Headers
    body: bytes
    client: tuple[str, int] | None = None


@dataclass(frozen=True)
class HTTPAnswer:
    status: int
    headers: Headers
    body: bytes


@dataclass(frozen=True)
class HTTPHead:
    """A streamed answer's status and headers, before its body."""

    status: int
    headers: Headers


STREAMED_PATHS = ("/translate", "/summarize")  # the routes that take "stream": true (app/api/native.py)


def streams(call: HTTPCall) -> bool:
    """Whether ``call`` asks for a streamed answer: ``"stream": true`` in its JSON body, on a
    route that streams. (Whatever else is wrong with the body, the app says.)"""
    if call.method != "POST" or call.path not in STREAMED_PATHS or b'"stream"' not in call.body:
        return False
    try:
        body = json.loads(call.body)
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("stream") is True


async def read_capped(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """The body, or its first ``limit + 1`` bytes: enough for the app to answer its own 413
    without the front holding an unbounded body."""
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            return bytes(body[: limit + 1])
    return bytes(body)


def _scope(call: HTTPCall) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": call.method,
        "scheme": "http",
        "path": call.path,
        "raw_path": call.path.encode(),
        "query_string": call.query,
        "root_path": "",
        "headers": call.headers,
        "client": call.client,
        "server": None,
    }


def _receiver(call: HTTPCall) -> Any:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": call.body, "more_body": False}
        await asyncio.Event().wait()  # the client stays until the front cancels this call
        raise AssertionError("unreachable")

    return receive


async def answer(app: Any, call: HTTPCall) -> HTTPAnswer:
    """``call`` through the ASGI ``app`` (whose lifespan has started) in this process."""
    status, headers, body = 500, [], bytearray()

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status, headers = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))

    await app(_scope(call), _receiver(call), send)
    return HTTPAnswer(status, headers, bytes(body))


async def answer_stream(app: Any, call: HTTPCall) -> AsyncIterator[HTTPHead | bytes]:
    """``call`` through the ASGI ``app`` in this process, answered as it comes: its head, then
    each piece of its body. Closing the iterator early (the client left) cancels the call."""
    messages: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()  # None: the app returned

    async def run() -> None:
        try:
            await app(_scope(call), _receiver(call), messages.put)
        finally:
            messages.put_nowait(None)

    running = asyncio.ensure_future(run())
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                yield HTTPHead(message["status"], list(message.get("headers", [])))
            elif message["type"] == "http.response.body" and message.get("body"):
                yield message["body"]
        await running  # the app's own failure, if it had one
    finally:
        running.cancel()


def under(call: HTTPCall, span: Span | None) -> HTTPCall:
    """``call`` with ``span``'s context as its ``traceparent`` (and ``tracestate``): the replica's
    spans go below it. Untraced, the call as it came."""
    if span is None:
        return call
    parent, state = tracing.wire_of(span)
    headers = [(k, v) for k, v in call.headers if k not in (b"traceparent", b"tracestate")]
    headers.append((b"traceparent", parent.encode()))
    if state:
        headers.append((b"tracestate", state.encode()))
    return dataclasses.replace(call, headers=headers)


def naming(headers: list[tuple[bytes, bytes]], span: Span | None) -> list[tuple[bytes, bytes]]:
    """A replica's answer headers, naming the gateway's span as the answer's ``traceparent``."""
    if span is None:
        return headers
    own = tracing.traceparent(span.get_span_context()).encode()
    return [(k, v) for k, v in headers if k != b"traceparent"] + [(b"traceparent", own)]
