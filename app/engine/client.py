"""How the service and the routes reach the engine: one interface (app/registry/slots.py:
Models), two clients. ``InprocClient`` drives an EngineCore (app/engine/core.py) in this
process: the one-process layout and Ray replicas. ``ZmqClient`` (app/engine/zmq_client.py)
drives the engine process's core over ZeroMQ from a front process. Both send the same
operations (app/engine/wire.py) and read the same events back: a request is a stream of
events whose final one (Done or Failed) ends it, and a request whose caller is cancelled
(its client left) sends Cancel, so the engine drops what it has not run. A caller that
passes ``on_delta`` or ``on_result`` to ``infer`` streams: it hears each input's new text
as it is generated and each input's result as it settles, before ``infer`` returns them all.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from opentelemetry.trace import SpanKind

from app import errors, tracing
from app.catalog import Catalog
from app.engine import wire
from app.errors import ServiceError
from app.payloads import GenerationDelta
from app.registry.slots import CatalogSlots, ModelSlot, OnDelta, OnResult

if TYPE_CHECKING:
    from app.engine.core import EngineCore

ERRORS: dict[str, type[ServiceError]] = {
    cls.__name__: cls for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, ServiceError)
}
INPROC = "inproc"  # the origin an in-process client's operations carry

log = logging.getLogger(__name__)


class _Listener(NamedTuple):
    """Who hears a streamed request's events before its final one."""

    on_delta: OnDelta | None
    on_result: OnResult | None
    kind: str


def raised(failed: wire.Failed) -> ServiceError:
    """The engine's error, raised again where the request was made."""
    return ERRORS.get(failed.error, ServiceError)(failed.message, retry_after=failed.retry_after)


class EngineClient(CatalogSlots):
    """What both clients share: request ids, the requests waiting for their final event, and
    the operations. A transport sends (``_send``) and feeds events back (``_dispatch``)."""

    catalog: Catalog
    hub_online: bool

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future[Any], str | None]] = {}
        self._listeners: dict[int, _Listener] = {}

    def _send(self, op: Any) -> None:
        raise NotImplementedError

    def _prepare(self, op: Any) -> Any:
        """The operation as it travels (a front encodes it here, alone: see ZmqClient)."""
        return op

    def _dispatch(self, event: Any) -> None:
        """An event from the engine: the final one of a request or call resolves its waiter."""
        if isinstance(event, wire.Delta | wire.Result | wire.ResultRaw):
            self._progress(event)
        elif isinstance(event, wire.Done | wire.DoneRaw | wire.Failed | wire.Answer):
            self._listeners.pop(event.rid, None)
            waiting = self._pending.pop(event.rid, None)
            if waiting is None or waiting[0].done():
                return  # its caller left
            future, kind = waiting
            if isinstance(event, wire.Failed):
                future.set_exception(raised(event))
            elif isinstance(event, wire.Answer):
                future.set_result(event.value)
            elif isinstance(event, wire.DoneRaw):
                assert kind is not None
                future.set_result((wire.RESULTS[kind](event.results), event.sizes, event.tokens))
            else:
                future.set_result((event.results, event.sizes, event.tokens))
        else:
            self._event(event)

    def _progress(self, event: wire.Delta | wire.Result | wire.ResultRaw) -> None:
        """A streamed request's Delta or Result, to its listener (none: its caller left)."""
        listener = self._listeners.get(event.rid)
        if listener is None:
            return
        try:
            if isinstance(event, wire.Delta):
                if listener.on_delta is not None:
                    listener.on_delta(event.index, GenerationDelta(event.text, event.tokens))
            elif listener.on_result is not None:
                result = wire.RESULT[listener.kind](event.result) if isinstance(event, wire.ResultRaw) else event.result
                listener.on_result(event.index, result)
        except Exception:  # a listener's fault must not cost the other requests of this frame
            log.exception("a streamed request's listener failed on %s", type(event).__name__)

    def _event(self, event: Any) -> None:
        """An event that answers no request (a front's: states, metrics asked for)."""

    async def _ask(self, op: Callable[[int], Any], kind: str | None = None, listener: _Listener | None = None) -> Any:
        rid = next(self._ids)
        prepared = self._prepare(op(rid))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = (future, kind)
        if listener is not None:
            self._listeners[rid] = listener
        self._send(prepared)
        try:
            return await future
        except asyncio.CancelledError:
            self._listeners.pop(rid, None)
            if self._pending.pop(rid, None) is not None:
                self._send(wire.Cancel(rid))  # the client left: the engine drops its work
            raise

    async def _call(self, op: str, *args: Any) -> Any:
        return await self._ask(lambda rid: wire.Call(rid, op, list(args)))

    # -- the models ----------------------------------------------------------------------

    async def get_or_load(self, name: str) -> ModelSlot:
        slot = self.slot(name)  # 404 for a name outside the catalog, before asking the engine
        await self._call("load", name)
        return slot

    async def unload(self, name: str) -> bool:
        self.slot(name)
        unloaded: bool = await self._call("unload", name)
        return unloaded

    async def split_into_chunks(self, name: str, text: str) -> list[str]:
        self.slot(name)
        chunks: list[str] = await self._call("split", name, text)
        return chunks

    async def split_keeping_lines(self, name: str, text: str) -> tuple[list[str], list[str]]:
        self.slot(name)
        pieces, separators = await self._call("split_lines", name, text)  # a list, over the wire
        return list(pieces), list(separators)

    async def take(self, tenant: str, inputs: int) -> None:
        """The tenant's rate limit, held by the engine (app/engine/rate.py)."""
        await self._call("take", tenant, inputs)

    async def infer(
        self,
        name: str,
        payloads: Sequence[Any],
        *,
        timeout_s: float,
        group: Hashable = None,
        tenant: Hashable = None,
        sizes: list[int] | None = None,
        on_delta: OnDelta | None = None,
        on_result: OnResult | None = None,
    ) -> list[Any]:
        """Run one request's inputs on a model (loaded first if need be); the deadline starts
        once it is loaded. ``tenant``: whom the inputs count against (fairness); ``sizes`` gets
        the sizes of the batches they ran in. Streamed (either callback given): ``on_delta(i,
        piece)`` hears input i's new text as it is generated, ``on_result(i, result)`` its
        result as soon as it has one, both on this event loop, before this returns."""
        if not payloads:
            return []
        kind = wire.KIND_OF[type(payloads[0])]
        struct = wire.INFER[kind]
        listener = None if on_delta is None and on_result is None else _Listener(on_delta, on_result, kind)
        stream = listener is not None
        hop = carried = server = None
        if tracing.enabled:
            hop, carried, server = _hop(name, len(payloads))

        def request(rid: int) -> wire.Infer:
            # Each kind's struct adds its typed payloads; tenants are API keys' names, strings.
            return struct(rid, name, timeout_s, tenant, group, payloads, stream=stream, trace=carried)  # type: ignore[misc, arg-type]

        try:
            results, batch_sizes, tokens = await self._ask(request, kind, listener)
            if hop is not None:
                _count_tokens(hop, server, tokens)
        except BaseException as exc:
            if hop is not None:
                tracing.failed(hop, type(exc).__name__)
            raise
        finally:
            if hop is not None:
                hop.end()
        if sizes is not None:
            sizes.extend(batch_sizes)
        return list(results)


def _count_tokens(hop: Any, server: Any, tokens: int) -> None:
    """The request's tokens on the hop's span and, summed over its calls to the engine (a
    chunked summary makes several), on the request's server span above it."""
    hop.set_attribute("tessera.tokens", tokens)
    if server is not None and server.is_recording():
        attributes = getattr(server, "attributes", None) or {}
        server.set_attribute("tessera.tokens", int(attributes.get("tessera.tokens", 0)) + tokens)


def _hop(model: str, inputs: int) -> tuple[Any, tuple[str, str] | None, Any]:
    """The span of a request's trip to the engine and back (None where its trace is not
    sampled), the context the engine's spans go under, and the request's server span."""
    attributes = {"tessera.model": model, "tessera.inputs": inputs}
    held = tracing.request.get()
    if held is None:  # not an HTTP request's: below the current span, or a trace of its own
        hop = tracing.start_here("tessera.engine", kind=SpanKind.CLIENT, attributes=attributes)
        return (hop if hop.is_recording() else None), tracing.wire_of(hop), None
    server, carried = held
    if not server.is_recording():
        return None, carried, server  # not sampled: only the context travels
    hop = tracing.start("tessera.engine", server.get_span_context(), kind=SpanKind.CLIENT, attributes=attributes)
    return hop, tracing.wire_of(hop), server


class InprocClient(EngineClient):
    """The engine core in this process: operations are handed to it directly, events come
    back as calls, and the slots are the registry's own (live, nothing to mirror)."""

    def __init__(self, core: EngineCore) -> None:
        super().__init__()
        self.core = core
        self.catalog = core.registry.catalog
        self.hub_online = core.registry.hub_online  # decided once, as the registry opened
        self._slots = {slot.entry.name: slot for slot in core.registry.slots()}
        core.deliver = lambda origin, event: self._dispatch(event)

    @property
    def connected(self) -> bool:
        """Whether the models answer: always, in-process."""
        return True

    async def refresh(self) -> None:
        """The slots are the registry's own: always up to date."""

    def _send(self, op: Any) -> None:
        self.core.handle(INPROC, op)
