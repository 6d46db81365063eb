"""Distributed tracing with OpenTelemetry: each process's tracer, and the W3C trace context as
it crosses HTTP, the ZeroMQ wire and Ray handles (docs/tracing.md).

Off by default. On when ``TESSERA_OPENTELEMETRY`` (or ``TESSERA_TRACING``) is true or an OTLP
endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``): each
process (the one process, a front, the engine, a Ray gateway or replica) then configures the
SDK itself, a batching OTLP/HTTP exporter under the standard ``OTEL_*`` variables (service
name, resource attributes, sampler), unless the process already set up a provider of its own,
which is used instead. Every site on the request path reads ``enabled`` first: off, tracing
costs that one check and nothing else. Below the HTTP server span, a trace that is not
sampled gets no span objects at all: its context still travels (so that nothing below
starts a trace of its own), and every site checks ``sampled`` before it makes a span.
"""

from __future__ import annotations

import contextvars
import logging
import os
import random
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

# The API only (FastAPI depends on it); the SDK and the exporter are imported as tracing starts.
from opentelemetry import trace
from opentelemetry.context import Context, attach
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    get_current_span,
    set_span_in_context,
)

from app.config import Settings

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger(__name__)

ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
TRACER_NAME = "tessera"

enabled = False  # read on the hot path: True while an app or an engine of this process traces
tracer: Tracer = trace.NoOpTracer()  # the provider's, once configured
_users = 0
_configured = False

# A span context as it travels (the engine wire, a relayed request's headers): the W3C
# ``traceparent`` and ``tracestate`` header values.
WireContext = tuple[str, str]

# The HTTP request being served here: its server span and that span's context as it travels.
# Set by the request middleware; an unsampled request is only here (no OpenTelemetry context).
request: contextvars.ContextVar[tuple[Span, WireContext] | None] = contextvars.ContextVar("request", default=None)

# The head sampling rule of the provider made here, when it is a parent-based one with a known
# root (always on, always off, a ratio): the bound a new trace id must be under to be sampled.
# It lets a request that is not sampled skip the SDK altogether (see start_server).
_root_bound: int | None = None
_preset = threading.local()  # a trace id the next root span takes (see _PresetIds)


def requested(settings: Settings) -> bool:
    """Whether this process should trace: the setting, or an OTLP endpoint in the environment."""
    return settings.opentelemetry or any(os.environ.get(name) for name in ENDPOINTS)


def configure(settings: Settings, role: str) -> bool:
    """Turn tracing on for one user (an app's lifespan, the engine) if ``settings`` ask for it;
    ``role`` names the process on its spans (``tessera.process``). Pair with ``release``."""
    global enabled, tracer, _users, _configured
    if not requested(settings):
        return False
    if not _configured:
        provider = trace.get_tracer_provider()
        if not _is_sdk(provider):
            provider = _make_provider(role)
            trace.set_tracer_provider(provider)
        tracer = provider.get_tracer(TRACER_NAME)
        _configured = True
    _users += 1
    enabled = True
    return True


def release() -> None:
    """One user is done: what its spans left is exported now (its process may exit next); the
    last one turns tracing off."""
    global enabled, _users
    _users = max(0, _users - 1)
    if _users == 0:
        enabled = False
    flush()


def flush() -> None:
    force_flush = getattr(trace.get_tracer_provider(), "force_flush", None)
    if force_flush is not None:
        force_flush(5_000)  # milliseconds: an exporter that cannot reach its endpoint gives up


def _is_sdk(provider: Any) -> bool:
    from opentelemetry.sdk.trace import TracerProvider

    return isinstance(provider, TracerProvider)


def _make_provider(role: str) -> Any:
    """The SDK's provider as the ``OTEL_*`` variables say, with a batching OTLP/HTTP exporter."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    global _root_bound
    resource = Resource.create({"tessera.process": role, "process.pid": os.getpid()})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "tessera"}))
    # Its sampler: OTEL_TRACES_SAMPLER(_ARG)'s, as the SDK reads them.
    provider = TracerProvider(resource=resource, id_generator=_preset_ids())
    provider.sampler = _linked_sampler(provider.sampler)
    _root_bound = _parent_based_bound()
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        log.error("tracing is on but the OTLP exporter is missing (pip install 'tessera[otel]'): no span leaves")
        return provider
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def _parent_based_bound() -> int | None:
    """The trace-id bound of the configured sampler's root rule, for the parent-based
    samplers whose root decision is the trace id's alone; None for any other."""
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

    name = os.environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    if name == "parentbased_always_on":
        return TraceIdRatioBased.get_bound_for_rate(1.0)
    if name == "parentbased_always_off":
        return 0
    if name == "parentbased_traceidratio":
        try:
            rate = float(os.environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))
        except ValueError:
            rate = 1.0  # as the SDK falls back
        return TraceIdRatioBased.get_bound_for_rate(rate) if 0.0 <= rate <= 1.0 else None
    return None


def _preset_ids() -> Any:
    """The SDK's random ids, except that a root span may take the trace id its sampling
    decision was made on (start_server decides before it asks the SDK for a span)."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class PresetIds(RandomIdGenerator):
        def generate_trace_id(self) -> int:
            preset: int = getattr(_preset, "trace_id", 0)
            if preset:
                _preset.trace_id = 0
                return preset
            return super().generate_trace_id()

    return PresetIds()


def _linked_sampler(delegate: Any) -> Any:
    """The configured sampler, except that a span without a parent that links to a sampled
    span is sampled: a batch is traced whenever one of the requests it serves is."""
    from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

    class LinkedSampler(Sampler):
        def should_sample(
            self,
            parent_context: Context | None,
            trace_id: int,
            name: str,
            kind: SpanKind | None = None,
            attributes: Any = None,
            links: Sequence[Link] | None = None,
            trace_state: TraceState | None = None,
        ) -> SamplingResult:
            if (
                links
                and any(link.context.trace_flags.sampled for link in links)
                and not get_current_span(parent_context).get_span_context().is_valid  # a root
            ):
                return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
            result: SamplingResult = delegate.should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state
            )
            return result

        def get_description(self) -> str:
            return f"LinkedSampler{{{delegate.get_description()}}}"

    return LinkedSampler()


# -- spans and the W3C trace context --------------------------------------------------------


def traceparent(context: SpanContext) -> str:
    """The ``traceparent`` header value naming ``context``."""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def wire_of(span: Span) -> WireContext:
    """How ``span``'s context travels."""
    context = span.get_span_context()
    state = context.trace_state
    return traceparent(context), state.to_header() if state else ""


def parse(header: str, state: str = "") -> SpanContext | None:
    """The remote span context a ``traceparent`` (and ``tracestate``) header names, or None
    when it is malformed: then a new trace starts, as the W3C recommendation says."""
    parts = header.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff" or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    if parts[0] == "00" and (len(parts) != 4 or len(parts[3]) != 2):
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3][:2], 16)
    except ValueError:
        return None
    if not trace_id or not span_id or len(parts[3]) < 2:
        return None
    trace_state = TraceState.from_header([state]) if state else TraceState()
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags & 1), trace_state=trace_state)


def start_server(method: str, path: str, headers: Iterable[tuple[bytes, bytes]]) -> Span:
    """The server span of an HTTP request, below the caller's ``traceparent`` if it sent one
    (then with its ``tracestate``); renamed once its route is known."""
    given = state = ""
    for name, value in headers:
        if name == b"traceparent":
            given = value.decode("latin-1")
        elif name == b"tracestate":
            state = value.decode("latin-1")
    parent = parse(given, state) if given else None
    bound = _root_bound
    if bound is not None:  # head sampling decided here: a request not sampled costs no SDK call
        if parent is None:
            trace_id = random.getrandbits(128) or 1
            if (trace_id & _TRACE_ID_LIMIT) >= bound:
                return _unsampled(trace_id, TraceState())
            _preset.trace_id = trace_id  # the SDK's sampler decides the same on this id
        elif not parent.trace_flags.sampled:
            return _unsampled(parent.trace_id, parent.trace_state)
    attributes = {"http.request.method": method, "url.path": path}
    return start(f"{method} {path}", parent, kind=SpanKind.SERVER, attributes=attributes)


_TRACE_ID_LIMIT = (1 << 64) - 1  # the trace id bits a ratio sampler reads (TraceIdRatioBased's)


def _unsampled(trace_id: int, trace_state: TraceState) -> Span:
    """A server span of a trace that is not sampled: its context only, for the answer and the
    engine (the SDK would make the same, at several times the cost)."""
    span_id = random.getrandbits(64) or 1
    return NonRecordingSpan(SpanContext(trace_id, span_id, False, TraceFlags(0), trace_state))


def sampled_on_wire(carried: WireContext) -> bool:
    """Whether a travelling context's ``traceparent`` says its trace is sampled."""
    last = carried[0][-1:]
    return bool(last) and last in "13579bdf"  # the flags' last hex digit: bit 0 is "sampled"


def from_wire(carried: WireContext | None) -> SpanContext | None:
    return parse(*carried) if carried is not None else None


def context_of(parent: SpanContext | None) -> Context:
    """A context whose current span is ``parent`` (an empty one for None: a new trace)."""
    return set_span_in_context(NonRecordingSpan(parent)) if parent is not None else Context()


def start(
    name: str,
    parent: SpanContext | None = None,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: dict[str, Any] | None = None,
    links: Iterable[SpanContext] = (),
    start_ns: int | None = None,
) -> Span:
    """A span below ``parent`` (None: the root of a new trace), linked to ``links``."""
    return tracer.start_span(
        name,
        context=context_of(parent),
        kind=kind,
        attributes=attributes,
        links=[Link(context) for context in links] or None,
        start_time=start_ns,
    )


def start_here(name: str, *, kind: SpanKind = SpanKind.INTERNAL, attributes: dict[str, Any] | None = None) -> Span:
    """A span below the current one (of this task or thread)."""
    return tracer.start_span(name, kind=kind, attributes=attributes)


def task_context(span: Span) -> contextvars.Context:
    """A copy of this context in which ``span`` is current: for a task that works under it."""
    copied = contextvars.copy_context()
    copied.run(attach, set_span_in_context(span))
    return copied


def current() -> Span:
    return get_current_span()


def sampled(context: SpanContext | None) -> bool:
    return context is not None and context.trace_flags.sampled


def record(
    name: str, parent: SpanContext, started_ns: int, ended_ns: int, attributes: dict[str, Any] | None = None
) -> None:
    """A span that is over, recorded after the fact (a wait in the queue, say)."""
    start(name, parent, attributes=attributes, start_ns=started_ns).end(ended_ns)


def failed(span: Span, description: str) -> None:
    span.set_status(Status(StatusCode.ERROR, description))


def epoch_ns(monotonic_s: float) -> int:
    """A ``time.monotonic()`` reading as a span's timestamp (nanoseconds since the epoch)."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)


def ids_of(span: Span) -> tuple[str, str] | None:
    """``(trace_id, span_id)`` in hex of a sampled span (log lines, exemplars); None otherwise."""
    context = span.get_span_context()
    if not context.trace_flags.sampled:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"
