"""The engine: the registry, its batchers and the models, behind a ZeroMQ ROUTER socket, in
a process of its own; fronts (app/engine/client.py) send it requests in bulk.

A frame of requests costs the engine one read and one decode; each request then goes
straight into its model's batcher (``DynamicBatcher.enqueue``) with one small slot object
per input where the in-process path has an asyncio task, a timeout and a future per
input. A lane sets the results on those slots (on this loop, one wake-up per batch); a
request whose inputs are all done joins the next frame back to its front. What the
batcher guarantees holds across the process boundary:

- deadlines: ``timeout_s`` counts from enqueueing (the model loaded), and a heap of
  deadlines answers 504 at the instant, as ``submit``'s timeout does; queued inputs of an
  expired request are dropped by the lanes;
- a client that leaves: its front sends Cancel, and its queued inputs are dropped;
- 429 with Retry-After, 413, 503: the batcher's and the registry's errors travel by type
  name, message and retry_after, and fronts raise them again;
- per-input isolation and fairness: the batcher's, unchanged (the tenant travels);
- the rate limit: one bucket per tenant here, whichever front a request came through.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

import zmq

from app.batching.batcher import past_deadline
from app.engine import wire
from app.errors import InferenceFailed, ModelUnavailable, ServiceError
from app.registry.registry import ModelRegistry
from app.registry.slots import ModelSlot, ModelState
from app.service.checks import RateLimit

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0  # States go to every front this often, and at once after a change
TICK_S = 0.2  # how often the engine looks for a change of state to send
FRONT_SILENT_S = 5.0  # a front not heard from for this long is forgotten
EXPOSE_WAIT_S = 1.0  # how long a metrics scrape waits for the fronts' own metrics
CHANGES_STATES = frozenset({"load", "unload"})  # calls after which fronts get the states at once
COMPACT_ABOVE = 4096  # finished requests the deadline heap may hold before it is rebuilt


class _Input:
    """One input's outcome, set by a lane (through this loop) as it would set a future."""

    __slots__ = ("_done", "index", "request")

    def __init__(self, request: _Request, index: int) -> None:
        self.request, self.index, self._done = request, index, False

    def done(self) -> bool:
        return self._done

    def set_result(self, result: Any) -> None:
        self._done = True
        self.request.resolved(self.index, result)

    def set_exception(self, exception: BaseException) -> None:
        self._done = True
        self.request.failed(exception)

    def cancel(self) -> None:
        self._done = True


class _Request:
    """One front's request in the engine, from enqueueing to its answer."""

    __slots__ = ("core", "deadline", "finished", "inputs", "key", "left", "results", "slot", "ticket")

    def __init__(self, core: EngineCore, key: tuple[bytes, int], slot: ModelSlot, deadline: float, n: int) -> None:
        self.core, self.key, self.slot, self.deadline = core, key, slot, deadline
        self.results: list[Any] = [None] * n
        self.left = n
        self.inputs = [_Input(self, i) for i in range(n)]
        self.ticket: Any = None
        self.finished = False

    def resolved(self, index: int, result: Any) -> None:
        self.results[index] = result
        self.left -= 1
        if self.left == 0 and not self.finished:
            self.core.finish(self, wire.Done(self.key[1], self.results, self.ticket.batch_sizes))

    def failed(self, error: BaseException) -> None:
        if not self.finished:
            self.core.finish(self, failure(self.key[1], error))

    def drop(self) -> None:
        """Every input done: the lanes drop those not yet run."""
        for item in self.inputs:
            item.cancel()


class _Gathering:
    """The fronts' metrics for one scrape, as they come in."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.texts: dict[str, str] = {}
        self.complete = asyncio.Event()
        if expected == 0:
            self.complete.set()

    def add(self, front: str, text: str) -> None:
        self.texts[front] = text
        if len(self.texts) >= self.expected:
            self.complete.set()


def failure(rid: int, error: BaseException) -> wire.Failed:
    if not isinstance(error, ServiceError):
        log.error("engine call failed", exc_info=error)
        error = InferenceFailed(f"the engine failed: {type(error).__name__}: {error}")
    return wire.Failed(rid, type(error).__name__, error.message, error.retry_after)


class EngineCore:
    """Serves ``registry`` to the fronts on ``address`` (an ``ipc://`` path) until closed."""

    def __init__(
        self,
        registry: ModelRegistry,
        address: str,
        *,
        exposition: Callable[[], bytes],
        merge: Callable[[dict[str, str]], str],
        rate_limit: RateLimit | None = None,
    ) -> None:
        self.registry = registry
        self.address = address
        self.exposition = exposition
        self.rate_limit = rate_limit
        self.merge = merge
        self.fronts: dict[bytes, float] = {}  # identity -> when last heard from
        self._requests: dict[tuple[bytes, int], _Request] = {}
        self._awaiting_load: dict[tuple[bytes, int], bool] = {}  # -> cancelled meanwhile
        self._deadlines: list[tuple[float, int, _Request]] = []
        self._seq = itertools.count()
        self._expiry: asyncio.TimerHandle | None = None
        self._outbox: dict[bytes, list[Any]] = {}
        self._flushing = False
        self._background: set[asyncio.Task[Any]] = set()
        self._exposes: dict[int, _Gathering] = {}
        self._expose_ids = itertools.count()
        self._sent_states: bytes = b""
        self._socket: zmq.Socket[bytes] | None = None
        self._ticker: asyncio.Task[None] | None = None

    # -- the socket -----------------------------------------------------------------------

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        sock = wire.open_socket(zmq.ROUTER)
        sock.bind(self.address)
        self._socket = sock
        self._fd: int = sock.getsockopt(zmq.FD)  # type: ignore[assignment]
        self.loop.add_reader(self._fd, self._readable)
        self._ticker = self.loop.create_task(self._tick())
        log.info("engine listening on %s", self.address)

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        for task in list(self._background):
            task.cancel()
        if self._socket is not None:
            self.loop.remove_reader(self._fd)
            self._socket.close(linger=0)
            self._socket = None

    def _readable(self) -> None:
        sock = self._socket
        while sock is not None:
            try:
                front, frame = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.fronts[front] = time.monotonic()
            try:
                ops = wire.decode_to_engine(frame)
            except Exception as exc:  # not a front of ours: say so and carry on
                log.error("undecodable frame from %r: %s", front, exc)
                continue
            for op in ops:
                self._dispatch(front, op)

    def _send(self, front: bytes, op: Any) -> None:
        self._outbox.setdefault(front, []).append(op)
        if not self._flushing:
            self._flushing = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        outbox, self._outbox = self._outbox, {}
        sock = self._socket
        if sock is None:
            return
        for front, ops in outbox.items():
            with contextlib.suppress(zmq.ZMQError):  # a front that left: nobody to answer
                sock.send_multipart((front, wire.encode(ops)), zmq.NOBLOCK)
        # The socket's descriptor signals edges: a frame that came in while sending would
        # otherwise wait for the next one.
        self._readable()

    # -- requests -------------------------------------------------------------------------

    def _dispatch(self, front: bytes, op: Any) -> None:
        if isinstance(op, wire.Infer):
            self._infer(front, op)
        elif isinstance(op, wire.Cancel):
            key = (front, op.rid)
            if key in self._awaiting_load:
                self._awaiting_load[key] = True
            request = self._requests.get(key)
            if request is not None:
                request.drop()
                self._release(request)
        elif isinstance(op, wire.Call):
            self._spawn(self._call(front, op))
        elif isinstance(op, wire.Hello):
            self._send(front, self._states())
        elif isinstance(op, wire.Exposition):
            gathering = self._exposes.get(op.rid)
            if gathering is not None:
                gathering.add(front.decode().partition("/")[0], op.text)  # "front-0/<pid>": front-0

    def _infer(self, front: bytes, op: wire.Infer) -> None:
        try:
            slot = self.registry.slot(op.model)
        except ServiceError as exc:
            self._send(front, failure(op.rid, exc))
            return
        if slot.state is ModelState.loaded and slot.batcher is not None:
            self._enqueue(front, op, slot)
        else:  # the model loads first (once, however many ask), off this path
            self._awaiting_load[(front, op.rid)] = False
            self._spawn(self._load_then_enqueue(front, op))

    async def _load_then_enqueue(self, front: bytes, op: wire.Infer) -> None:
        try:
            slot = await self.registry.get_or_load(op.model)
        except ServiceError as exc:
            if not self._awaiting_load.pop((front, op.rid), False):
                self._send(front, failure(op.rid, exc))
            return
        if not self._awaiting_load.pop((front, op.rid), False):  # its client left while it loaded
            self._enqueue(front, op, slot)

    def _enqueue(self, front: bytes, op: wire.Infer, slot: ModelSlot) -> None:
        batcher = slot.batcher
        if batcher is None:  # unloaded between the load and now
            self._send(front, failure(op.rid, ModelUnavailable(f"model '{op.model}' was unloaded; retry")))
            return
        payloads: list[Any] = op.payloads  # type: ignore[attr-defined]  # each kind's struct has them
        deadline = time.monotonic() + op.timeout_s
        request = _Request(self, (front, op.rid), slot, deadline, len(payloads))
        try:
            request.ticket = batcher.enqueue(
                payloads, request.inputs, loop=self.loop, group=op.group, deadline=deadline, tenant=op.tenant
            )
        except ServiceError as exc:
            self._send(front, failure(op.rid, exc))
            return
        slot.hold()
        self._requests[request.key] = request
        heapq.heappush(self._deadlines, (deadline, next(self._seq), request))
        if self._deadlines[0][2] is request:
            self._arm()

    def finish(self, request: _Request, answer: wire.Done | wire.Failed) -> None:
        """Answer ``request`` (its results, or its first error) and forget it."""
        request.drop()
        self._release(request)
        self._send(request.key[0], answer)

    def _release(self, request: _Request) -> None:
        if request.finished:
            return
        request.finished = True
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

    # -- control --------------------------------------------------------------------------

    async def _call(self, front: bytes, op: wire.Call) -> None:
        try:
            value = await self.CALLS[op.op](self, *op.args)
        except Exception as exc:
            self._send(front, failure(op.rid, exc))
        else:
            self._send(front, wire.Answer(op.rid, value))
        if op.op in CHANGES_STATES:  # every front learns now, not at the next tick
            self._send_states_if_changed()

    async def _load(self, name: str) -> None:
        await self.registry.get_or_load(name)

    async def _unload(self, name: str) -> bool:
        return await self.registry.unload(name)

    async def _split(self, name: str, text: str) -> list[str]:
        return await self.registry.split_into_chunks(name, text)

    async def _take(self, tenant: str, inputs: int) -> None:
        if self.rate_limit is not None:
            await self.rate_limit.take(tenant, inputs)

    async def _current_states(self) -> wire.States:
        return self._states()

    async def _metrics(self) -> str:
        """The engine's metrics and every live front's, each sample labelled with its process."""
        rid = next(self._expose_ids)
        fronts = list(self.fronts)
        gathering = self._exposes[rid] = _Gathering(len(fronts))
        for front in fronts:
            self._send(front, wire.Expose(rid))
        try:
            with contextlib.suppress(TimeoutError):  # a front that died meanwhile is left out
                await asyncio.wait_for(gathering.complete.wait(), EXPOSE_WAIT_S)
        finally:
            del self._exposes[rid]
        return self.merge({"engine": self.exposition().decode(), **dict(sorted(gathering.texts.items()))})

    CALLS: dict[str, Callable[..., Any]] = {
        "load": _load,
        "unload": _unload,
        "split": _split,
        "take": _take,
        "metrics": _metrics,
        "states": _current_states,
    }

    # -- states ---------------------------------------------------------------------------

    def _states(self) -> wire.States:
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

    def _send_states_if_changed(self, always: bool = False) -> None:
        states = self._states()
        encoded = wire.encode(states)
        if always or encoded != self._sent_states:
            self._sent_states = encoded
            for front in self.fronts:
                self._send(front, states)

    async def _tick(self) -> None:
        last = 0.0
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            for front, heard in list(self.fronts.items()):
                if now - heard > FRONT_SILENT_S:
                    del self.fronts[front]
            beat = now - last >= HEARTBEAT_S
            if beat:
                last = now
            self._send_states_if_changed(always=beat)

    def _spawn(self, work: Any) -> None:
        task = self.loop.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
