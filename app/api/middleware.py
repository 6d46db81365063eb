"""Per-request context: an id (the client's X-Request-ID or a new one), metrics and the access
log (from the accounting routes leave on the request's state), the drain's count, and, when
tracing is on (app/tracing.py), the request's server span: a child of the caller's
``traceparent``, current while the request runs, named on the answer's ``traceparent``."""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.trace import Span, set_span_in_context
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import tracing
from app.api.drain import RETRY_AFTER_S, Drain

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")
access_log = logging.getLogger("tessera.access")
REPLICA_HEADER = b"x-tessera-replica"  # on a cluster: which replica answered (app/ray_serve.py)
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

UNTRACED = ("/health", "/metrics")  # probes and scrapes: no trace of their own

# (route, model, status, seconds, exemplar): an exemplar names the request's trace (a sampled one).
Observer = Callable[[str, str, int, float, "dict[str, str] | None"], None]


class RequestIdFilter(logging.Filter):
    """Puts the current request id on every log record as ``request_id``, and with tracing on
    the current span's ``trace_id`` and ``span_id`` (those of a sampled trace)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        if tracing.enabled:
            ids = tracing.ids_of(tracing.current())
            if ids is not None:
                record.trace_id, record.span_id = ids
        return True


async def send_json_error(
    send: Send, status: int, code: str, message: str, request_id: str | None, headers: dict[str, str] | None = None
) -> None:
    """An error answer written straight to ASGI, for the checks that run before any route."""
    body = json.dumps({"error": code, "message": message, "request_id": request_id}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class RequestContextMiddleware:
    """Pure ASGI, so that it costs microseconds and never buffers a body. It also keeps the
    drain's count of requests in flight, and refuses new ones while the server drains."""

    def __init__(
        self,
        app: ASGIApp,
        observe: Observer | None = None,
        drain: Drain | None = None,
        replica: str | None = None,
    ) -> None:
        self.app = app
        # A replica of a cluster names itself on every answer, and leaves the request id to the
        # router in front, which echoes it (Ray Serve's proxy).
        self.own_headers = [(REPLICA_HEADER, replica.encode())] if replica else None
        self.observe = observe
        self.drain = drain or Drain()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        # random, not os.urandom: an id needs no secrecy, and getrandom() is a syscall per request.
        request_id = given if _SAFE_ID.match(given) else f"{random.getrandbits(64):016x}"
        # Routes put their accounting (model, inputs, batch_size: app.api.calls.call) here.
        stats: dict[str, Any] = scope.setdefault("state", {})
        stats["request_id"] = request_id
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500

        own = self.own_headers or [(b"x-request-id", request_id.encode())]
        span = None
        if tracing.enabled and not scope["path"].startswith(UNTRACED):
            span, held, carried = self._traced(scope)
            own = [*own, (b"traceparent", carried[0].encode())]

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), *own]
            await send(message)

        drain = self.drain
        try:
            if drain.refuses(scope["path"]):
                headers = {"Retry-After": str(RETRY_AFTER_S), "Connection": "close"}
                message = "this server is shutting down; retry the request (another replica will answer it)"
                await send_json_error(send_with_id, 503, "draining", message, request_id, headers)
                return
            drain.began()
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                drain.ended()
        finally:
            route = self._record(scope, status, time.perf_counter() - started, stats, span)
            if span is not None:
                self._end(span, held, scope, route, status, stats)
            request_id_var.reset(token)

    @staticmethod
    def _traced(scope: Scope) -> tuple[Span, tuple[Any, Any], tracing.WireContext]:
        """The request's server span, a child of the caller's ``traceparent``, made this
        request's (``tracing.request``) and, sampled, OpenTelemetry's current span."""
        span = tracing.start_server(scope["method"], scope["path"], scope["headers"])
        carried = tracing.wire_of(span)
        held = tracing.request.set((span, carried))
        attached = otel_context.attach(set_span_in_context(span)) if span.is_recording() else None
        return span, (held, attached), carried

    @staticmethod
    def _end(span: Span, held: tuple[Any, Any], scope: Scope, route: str, status: int, stats: dict[str, Any]) -> None:
        if span.is_recording():
            span.update_name(f"{scope['method']} {route}")
            span.set_attributes(
                {"http.route": route, "http.response.status_code": status, "tessera.request_id": stats["request_id"]}
            )
            if "model" in stats:
                span.set_attributes({"tessera.model": stats["model"], "tessera.inputs": stats.get("inputs", 0)})
            key = stats.get("key")
            if key is not None:  # the tenant's name, never its key
                span.set_attribute("tessera.tenant", key.tenant)
            if status >= 500:
                tracing.failed(span, f"HTTP {status}")
        span.end()
        token, attached = held
        if attached is not None:
            otel_context.detach(attached)
        tracing.request.reset(token)

    def _record(self, scope: Scope, status: int, seconds: float, stats: dict[str, Any], span: Span | None) -> str:
        route = getattr(scope.get("route"), "path", "unmatched")
        model = stats.get("model", "")
        if self.observe is not None:
            ids = tracing.ids_of(span) if span is not None else None
            self.observe(route, model, status, seconds, {"trace_id": ids[0], "span_id": ids[1]} if ids else None)
        access_log.info(
            "%s %s %d %.1fms model=%s inputs=%d batch=%d",
            scope["method"],
            scope["path"],
            status,
            seconds * 1000,
            model or "-",
            stats.get("inputs", 0),
            stats.get("batch_size", 0),
            extra={"route": route, "status": status, "model": model, "latency_ms": round(seconds * 1000, 2)},
        )
        return route
