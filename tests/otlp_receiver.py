"""A real OTLP/HTTP trace receiver for the tests: a small HTTP server that accepts
``POST /v1/traces``, decodes each ``ExportTraceServiceRequest`` (opentelemetry-proto) and
keeps its spans, with their process's resource attributes, for the tests to read."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


@dataclass
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root
    kind: int  # the OTLP enum: 1 internal, 2 server, 3 client
    attributes: dict[str, Any]
    links: list[tuple[str, str]]  # (trace_id, span_id)
    resource: dict[str, Any]
    error: bool
    start_ns: int
    end_ns: int


def _value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, which) if which else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


@dataclass
class Receiver:
    """Spans as they arrive; ``url`` is what OTEL_EXPORTER_OTLP_ENDPOINT names."""

    url: str = ""
    spans: list[ReceivedSpan] = field(default_factory=list)
    posts: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, body: bytes) -> None:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        with self.lock:
            self.posts += 1
            for resource_spans in request.resource_spans:
                resource = _attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(
                            ReceivedSpan(
                                name=span.name,
                                trace_id=span.trace_id.hex(),
                                span_id=span.span_id.hex(),
                                parent_id=span.parent_span_id.hex(),
                                kind=span.kind,
                                attributes=_attributes(span.attributes),
                                links=[(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                                resource=resource,
                                error=span.status.code == 2,
                                start_ns=span.start_time_unix_nano,
                                end_ns=span.end_time_unix_nano,
                            )
                        )

    def of_trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self.lock:
            return [span for span in self.spans if span.trace_id == trace_id]

    def named(self, name: str) -> list[ReceivedSpan]:
        with self.lock:
            return [span for span in self.spans if span.name == name]

    def tree(self, trace_id: str) -> str:
        """The trace's spans as an indented tree (and the spans that link into it), for a reader."""
        spans = self.of_trace(trace_id)
        ids = {span.span_id for span in spans}
        children: dict[str, list[ReceivedSpan]] = {}
        for span in sorted(spans, key=lambda s: s.start_ns):
            children.setdefault(span.parent_id if span.parent_id in ids else "", []).append(span)
        lines: list[str] = []

        def show(span: ReceivedSpan, depth: int) -> None:
            lines.append(f"{'  ' * depth}{describe(span)}")
            for child in children.get(span.span_id, []):
                show(child, depth + 1)

        for root in children.get("", []):
            show(root, 0)
        with self.lock:
            linking = [s for s in self.spans if any(t == trace_id for t, _ in s.links)]
        for span in linking:
            lines.append(f"linked: {describe(span)}")
            lines += [f"  {'  ' * 1}{describe(c)}" for c in self.spans if c.parent_id == span.span_id]
        return "\n".join(lines)


def describe(span: ReceivedSpan) -> str:
    process = span.resource.get("tessera.process", "?")
    links = f" links={[s for _, s in span.links]}" if span.links else ""
    attributes = {k: v for k, v in span.attributes.items() if k.startswith(("tessera.", "http.route", "http.resp"))}
    return f"{span.name} [{process}] span={span.span_id} parent={span.parent_id or '-'}{links} {attributes}"


class _Handler(BaseHTTPRequestHandler):
    receiver: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        if self.path != "/v1/traces":
            self.send_response(404)
            self.end_headers()
            return
        self.receiver.take(body)
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


def serve_receiver() -> Iterator[Receiver]:
    """A receiver on a free port, until the generator is closed."""
    receiver = Receiver()
    handler = type("Handler", (_Handler,), {"receiver": receiver})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
