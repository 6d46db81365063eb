"""The engine core: the one implementation of a request's lifecycle, whatever the process
layout. Intake, load-on-first-use, slot holds, deadlines, cancellation and the rate limit
live here; batching and fairness are the model's batcher's (app/batching/batcher.py).

The core speaks in operations and events (app/engine/wire.py): ``handle(origin, op)`` takes
an Infer, a Cancel or a Call from a client, and the answers go out through ``deliver(origin,
event)``. A request answers as a stream of events ending in one final event (Done or
Failed); a request that does not stream gets only the final one. One that streams also
gets, as they happen, its generating inputs' Delta events (their new text, which a lane
reports through ``_Input.delta``) and each input's Result as it settles. Clients reach the
core in-process (app/engine/client.py: InprocClient, the one-process layout and Ray
replicas) or over ZeroMQ from front processes (app/engine/server.py and ZmqClient): the
same core under both, as vLLM V1 puts one EngineCore under its in-process and multiprocess
clients.

- Deadlines: ``timeout_s`` counts from enqueueing (the model loaded); a heap of deadlines
  answers 504 at the instant, and the request's queued inputs are dropped.
- A client that leaves sends Cancel: its queued inputs are dropped at once, its running
  inputs' results discarded (generate stops their rows at the next step), nothing more runs.
- 429 with Retry-After, 413, 503: the batcher's and the registry's errors, as Failed events.
- Tracing (app/tracing.py): a request whose Infer carries a sampled trace context gets a span
  here, from intake to its final event, under the client's; its model's load (if it waits
  for one) and its wait in the queue go below it, and the batches that serve it link to it.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import Span, SpanKind

from app import tracing
from app.batching.batcher import past_deadline
from app.engine import wire
from app.engine.rate import RateLimit
from app.errors import InferenceFailed, ModelUnavailable, ServiceError
from app.registry.slots import ModelSlot, ModelState

if TYPE_CHECKING:  # a front process imports this module's wire, and no torch
    from app.payloads import GenerationDelta
    from app.registry.registry import ModelRegistry

log = logging.getLogger(__name__)

COMPACT_ABOVE = 4096  # finished requests the deadline heap may hold before it is rebuilt
CHANGES_STATES = frozenset({"load", "unload"})  # calls after which clients learn the states at once

Deliver = Callable[[Hashable, Any], None]  # (origin, event)


class _Input:
    """One input's outcome, set by a lane (through this loop) as it would set a future; a
    generating lane also reports its progress with ``delta``."""

    __slots__ = ("_done", "index", "request")

    def __init__(self, request: _Request, index: int) -> None:
        self.request, self.index, self._done = request, index, False

    def done(self) -> bool:
        return self._done

    @property
    def streams(self) -> bool:
        """Whether its client reads its text as it is generated (a lane then sends deltas)."""
        return bool(self.request.stream)

    def delta(self, piece: GenerationDelta) -> None:
        """New text of this input, as it generates: a Delta event if its request streams."""
        request = self.request
        if not self._done and request.stream and not request.finished:
            request.core.deliver(request.key[0], wire.Delta(request.key[1], self.index, piece.text, piece.tokens))

    def set_result(self, result: Any) -> None:
        self._done = True
        self.request.resolved(self.index, result)

    def set_exception(self, exception: BaseException) -> None:
        self._done = True
        self.request.failed(exception)

    def cancel(self) -> None:
        self._done = True


class _Request:
    """One client's request in the engine, from enqueueing to its final event."""

    __slots__ = (
        "core",
        "deadline",
        "finished",
        "inputs",
        "key",
        "left",
        "results",
        "slot",
        "span",
        "stream",
        "ticket",
    )

    def __init__(
        self,
        core: EngineCore,
        key: tuple[Hashable, int],
        slot: ModelSlot,
        deadline: float,
        n: int,
        stream: bool,
        span: Span | None,
    ) -> None:
        self.core, self.key, self.slot, self.deadline, self.stream = core, key, slot, deadline, stream
        self.span = span  # with tracing on, in a sampled trace: from intake to the final event
        self.results: list[Any] = [None] * n
        self.left = n
        self.inputs = [_Input(self, i) for i in range(n)]
        self.ticket: Any = None
        self.finished = False

    def resolved(self, index: int, result: Any) -> None:
        self.results[index] = result
        self.left -= 1
        if self.stream and not self.finished:
            self.core.deliver(self.key[0], wire.Result(self.key[1], index, result))
        if self.left == 0 and not self.finished:
            ticket = self.ticket
            self.core.finish(self, wire.Done(self.key[1], self.results, ticket.batch_sizes, ticket.tokens))

    def failed(self, error: BaseException) -> None:
        if not self.finished:
            self.core.finish(self, failure(self.key[1], error))


def request_span(op: wire.Infer) -> Span | None:
    """The engine's span of a request, below the client's (None: its trace is not sampled)."""
    if op.trace is not None and not tracing.sampled_on_wire(op.trace):
        return None  # read from the flags alone: an unsampled request costs no parsing here
    parent = tracing.from_wire(op.trace)
    attributes = {"tessera.model": op.model, "tessera.inputs": len(op.payloads), "tessera.stream": op.stream}  # type: ignore[attr-defined]
    span = tracing.start("tessera.engine.request", parent, kind=SpanKind.SERVER, attributes=attributes)
    return span if span.is_recording() else None


def ended(span: Span | None, answer: wire.Done | wire.Failed | None) -> None:
    """``span`` (of a request) ended with its answer: Failed marks it an error; None: cancelled."""
    if span is None:
        return
    if answer is None:
        span.set_attribute("tessera.cancelled", True)
    elif isinstance(answer, wire.Failed):
        tracing.failed(span, f"{answer.error}: {answer.message}")
    span.end()


def failure(rid: int, error: BaseException) -> wire.Failed:
    if not isinstance(error, ServiceError):
        log.error("engine call failed", exc_info=error)
        error = InferenceFailed(f"the engine failed: {type(error).__name__}: {error}")
    return wire.Failed(rid, type(error).__name__, error.message, error.retry_after)


def _nowhere(origin: Hashable, event: Any) -> None:
    log.warning("an engine event for %r with no client attached: %s", origin, type(event).__name__)


class EngineCore:
    """Serves ``registry``'s models to the clients attached through ``deliver``."""

    def __init__(self, registry: ModelRegistry, rate_limit: RateLimit | None = None) -> None:
        self.registry = registry
        self.rate_limit = rate_limit
        self.deliver: Deliver = _nowhere  # set by the transport: a client in-process, or the server
        self.on_states_changed: Callable[[], None] = lambda: None
        self.calls: dict[str, Callable[..., Any]] = {
            "load": self._load,
            "unload": self.registry.unload,
            "split": self.registry.split_into_chunks,
            "split_lines": self.registry.split_keeping_lines,
            "take": self._take,
            "states": self._current_states,
        }
        self._requests: dict[tuple[Hashable, int], _Request] = {}
        self._awaiting_load: dict[tuple[Hashable, int], bool] = {}  # -> cancelled meanwhile
        self._deadlines: list[tuple[float, int, _Request]] = []
        self._seq = itertools.count()
        self._expiry: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[Any]] = set()

    def start(self, preload: bool = True) -> None:
        """Begin serving on the running loop; ``preload`` loads the entries marked so, in the
        background (readiness waits for them)."""
        self.loop = asyncio.get_running_loop()
        if preload:
            self._spawn(self.preload())

    async def preload(self) -> None:
        """Load the catalog entries marked ``preload``, one after the other; a failure is
        logged (readiness reports it)."""
        for slot in self.registry.slots():
            if slot.entry.preload:
                try:
                    await self.registry.get_or_load(slot.entry.name)
                except ServiceError as exc:
                    log.error("preloading %s failed: %s", slot.entry.name, exc.message)

    async def close(self) -> None:
        """Stop: background work cancelled, requests still open answered 503, models unloaded."""
        for task in list(self._background):
            task.cancel()
        if self._expiry is not None:
            self._expiry.cancel()
        stopping = ModelUnavailable("this server is stopping; retry the request", retry_after=1)
        for request in list(self._requests.values()):
            self.finish(request, failure(request.key[1], stopping))
        await self.registry.close()

    # -- operations ------------------------------------------------------------------------

    def handle(self, origin: Hashable, op: Any) -> None:
        """One operation from the client ``origin``: Infer, Cancel or Call."""
        if isinstance(op, wire.Infer):
            self._infer(origin, op)
        elif isinstance(op, wire.Cancel):
            self.cancel(origin, op.rid)
        elif isinstance(op, wire.Call):
            self._spawn(self._call(origin, op))
        else:
            log.error("an operation the engine does not know, from %r: %r", origin, op)

    def cancel(self, origin: Hashable, rid: int) -> None:
        """The client left: its queued inputs go at once, its running ones are not waited for."""
        key = (origin, rid)
        if key in self._awaiting_load:
            self._awaiting_load[key] = True
        request = self._requests.get(key)
        if request is not None:
            self._release(request)

    def _infer(self, origin: Hashable, op: wire.Infer) -> None:
        span = request_span(op) if tracing.enabled else None
        try:
            slot = self.registry.slot(op.model)
        except ServiceError as exc:
            self._refuse(origin, op, exc, span)
            return
        if slot.state is ModelState.loaded and slot.batcher is not None:
            self._enqueue(origin, op, slot, span)
        else:  # the model loads first (once, however many ask), off this path
            self._awaiting_load[(origin, op.rid)] = False
            # Under the request's span: a load it starts is traced as its child.
            self._spawn(self._load_then_enqueue(origin, op, span), tracing.task_context(span) if span else None)

    async def _load_then_enqueue(self, origin: Hashable, op: wire.Infer, span: Span | None) -> None:
        key = (origin, op.rid)
        try:
            slot = await self.registry.get_or_load(op.model)
        except ServiceError as exc:
            if not self._awaiting_load.pop(key, False):
                self._refuse(origin, op, exc, span)
            else:
                ended(span, None)
            return
        if not self._awaiting_load.pop(key, False):  # its client left while it loaded
            self._enqueue(origin, op, slot, span)
        else:
            ended(span, None)

    def _refuse(self, origin: Hashable, op: wire.Infer, error: ServiceError, span: Span | None) -> None:
        answer = failure(op.rid, error)
        ended(span, answer)
        self.deliver(origin, answer)

    def _enqueue(self, origin: Hashable, op: wire.Infer, slot: ModelSlot, span: Span | None) -> None:
        batcher = slot.batcher
        if batcher is None:  # unloaded between the load and now
            self._refuse(origin, op, ModelUnavailable(f"model '{op.model}' was unloaded; retry"), span)
            return
        payloads: list[Any] = op.payloads  # type: ignore[attr-defined]  # each kind's struct has them
        deadline = time.monotonic() + op.timeout_s
        request = _Request(self, (origin, op.rid), slot, deadline, len(payloads), op.stream, span)
        try:
            request.ticket = batcher.enqueue(
                payloads,
                request.inputs,
                loop=self.loop,
                group=op.group,
                deadline=deadline,
                tenant=op.tenant,
                trace=span.get_span_context() if span is not None else None,
            )
        except ServiceError as exc:
            self._refuse(origin, op, exc, span)
            return
        slot.hold()
        self._requests[request.key] = request
        heapq.heappush(self._deadlines, (deadline, next(self._seq), request))
        if self._deadlines[0][2] is request:
            self._arm()

    def finish(self, request: _Request, answer: wire.Done | wire.Failed) -> None:
        """Answer ``request`` (its results, or its first error) and forget it."""
        if request.finished:
            return
        self._release(request, answer)
        self.deliver(request.key[0], answer)

    def _release(self, request: _Request, answer: wire.Done | wire.Failed | None = None) -> None:
        """``request`` is over (``answer``: how; None: its client left): its inputs not yet run
        are dropped, its slot let go."""
        if request.finished:
            return
        request.finished = True
        if request.span is not None:
            if request.ticket is not None:
                request.span.set_attributes(
                    {"tessera.tokens": request.ticket.tokens, "tessera.batch_sizes": request.ticket.batch_sizes}
                )
            ended(request.span, answer)
        for item in request.inputs:
            item.cancel()  # the lanes drop or discard what they hold of it
        batcher = request.slot.batcher
        if request.left and batcher is not None and request.ticket is not None:
            batcher.cancel(request.ticket)
        request.results, request.inputs = [], []  # the deadline heap may hold it a while yet
        self._requests.pop(request.key, None)
        if len(self._deadlines) > 2 * len(self._requests) + COMPACT_ABOVE:
            # Finished requests leave the heap lazily, at their deadline; under a steady load of
            # long deadlines they would pile up (a minute's worth at the default 60 s).
            self._deadlines = [entry for entry in self._deadlines if not entry[2].finished]
            heapq.heapify(self._deadlines)
        request.slot.let_go()

    def _arm(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry = self.loop.call_later(max(0.0, self._deadlines[0][0] - time.monotonic()), self._expire)

    def _expire(self) -> None:
        self._expiry = None
        now = time.monotonic()
        heap = self._deadlines
        while heap and (heap[0][0] <= now or heap[0][2].finished):
            _, _, request = heapq.heappop(heap)
            if not request.finished:
                self.finish(request, failure(request.key[1], past_deadline(request.slot.entry.name)))
        if heap:
            self._arm()

    # -- control ---------------------------------------------------------------------------

    async def _call(self, origin: Hashable, op: wire.Call) -> None:
        try:
            call = self.calls.get(op.op)
            if call is None:
                raise InferenceFailed(f"the engine has no operation '{op.op}'")
            value = await call(*op.args)
        except Exception as exc:
            self.deliver(origin, failure(op.rid, exc))
        else:
            self.deliver(origin, wire.Answer(op.rid, value))
        if op.op in CHANGES_STATES:  # every client learns now, not at the next tick
            self.on_states_changed()

    async def _load(self, name: str) -> None:
        await self.registry.get_or_load(name)

    async def _take(self, tenant: str, inputs: int) -> None:
        if self.rate_limit is not None:
            self.rate_limit.take(tenant, inputs)

    async def _current_states(self) -> wire.States:
        return self.states()

    def states(self) -> wire.States:
        """Every catalog entry's state, as clients mirror it."""
        slots = [
            wire.SlotState(
                s.entry.name,
                s.state.value,
                s.device,
                s.error,
                s.memory_bytes,
                s.load_seconds,
                s.queue_depth,
                s.loads,
                s.backend,
                s.backend_note,
            )
            for s in self.registry.slots()
        ]
        return wire.States(self.registry.hub_online, slots)

    def _spawn(self, work: Any, context: contextvars.Context | None = None) -> None:
        task = self.loop.create_task(work, context=context)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
