"""A front process's client of the engine process (app/engine/server.py), over one ZeroMQ
DEALER socket: the same operations and events as in-process (app/engine/client.py), encoded.

Requests leave in bulk: every operation a front has ready by the end of the event loop's
turn goes in one frame. The catalog's states are a mirror the engine refreshes on every
change and every second; an engine silent for ``ENGINE_SILENT_S`` fails what waits on it
with 503 and makes readiness 503.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from app.catalog import Catalog
from app.engine import wire
from app.engine.client import EngineClient
from app.errors import InvalidInput, ModelUnavailable, ServiceError
from app.registry.slots import ModelSlot, ModelState

log = logging.getLogger(__name__)

# The engine speaks every second; this long without a word, it is gone or stuck. Not less: on
# a starved machine (a test suite beside two busy processes) an engine loading a model went
# over 5 s without a heartbeat, and its fronts failed requests that it was about to answer.
ENGINE_SILENT_S = 30.0


class ZmqClient(EngineClient):
    """One front's connection to the engine at ``address``; ``identity`` names the front
    (its metrics carry it as ``process``)."""

    def __init__(self, catalog: Catalog, address: str, identity: str, exposition: Callable[[bool], bytes]) -> None:
        super().__init__()
        self.catalog = catalog
        self.hub_online = False
        self.address = address
        self.identity = identity
        self.exposition = exposition
        self._slots = {entry.name: ModelSlot(entry) for entry in catalog.models}
        self._outbox: list[Any] = []
        self._flushing = False
        self._heard = 0.0
        self._first_states = asyncio.Event()
        self._socket: zmq.Socket[bytes] | None = None
        self._watch: asyncio.Task[None] | None = None

    # -- the connection -------------------------------------------------------------------

    async def start(self, wait_s: float) -> None:
        """Connect and wait (up to ``wait_s``) for the engine's first word."""
        self.loop = asyncio.get_running_loop()
        # Unique per process: a front started again in its place must not be answered what
        # the engine still owed the one that died (their request ids start over).
        sock = wire.open_socket(zmq.DEALER, f"{self.identity}/{os.getpid()}".encode())
        sock.connect(self.address)
        self._socket = sock
        self._fd: int = sock.getsockopt(zmq.FD)  # type: ignore[assignment]
        self.loop.add_reader(self._fd, self._readable)
        self._send(wire.Hello(self.identity))
        self._watch = self.loop.create_task(self._watchdog())
        try:
            await asyncio.wait_for(self._first_states.wait(), wait_s)
        except TimeoutError:
            await self.close()
            raise RuntimeError(f"no engine answered on {self.address} within {wait_s:.0f} s") from None

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        self._fail_pending(ModelUnavailable("this server is stopping; retry the request", retry_after=1))
        if self._socket is not None:
            self.loop.remove_reader(self._fd)
            self._socket.close(linger=0)
            self._socket = None

    @property
    def connected(self) -> bool:
        """Whether the engine spoke within ``ENGINE_SILENT_S`` (readiness asks)."""
        return self._first_states.is_set() and time.monotonic() - self._heard < ENGINE_SILENT_S

    def _prepare(self, op: Any) -> Any:
        try:
            # Encoded here, alone: a value the wire cannot carry fails this request only, not
            # the others that share its frame.
            return msgspec.Raw(wire.encode(op))
        except (OverflowError, msgspec.EncodeError, TypeError) as exc:
            raise InvalidInput(
                f"this request holds a value the server cannot pass on ({exc}); send smaller numbers"
            ) from None

    def _send(self, op: Any) -> None:
        self._outbox.append(op)
        if not self._flushing:
            self._flushing = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        ops, self._outbox = self._outbox, []
        if self._socket is None:
            return
        self._socket.send(wire.encode(ops), zmq.NOBLOCK)
        self._readable()  # the descriptor signals edges (see EngineServer._flush)

    def _readable(self) -> None:
        sock = self._socket
        while sock is not None:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._heard = time.monotonic()
            for event in wire.decode_from_engine(frame):
                self._dispatch(event)

    def _event(self, event: Any) -> None:
        if isinstance(event, wire.States):
            self._mirror(event)
        elif isinstance(event, wire.Expose):
            self._send(wire.Exposition(event.rid, self.exposition(event.openmetrics).decode()))

    def _mirror(self, states: wire.States) -> None:
        self.hub_online = states.hub_online
        for seen in states.slots:
            slot = self._slots.get(seen.name)
            if slot is None:
                continue
            slot.state, slot.device, slot.error = ModelState(seen.state), seen.device, seen.error
            slot.memory_bytes, slot.load_seconds = seen.memory_bytes, seen.load_seconds
            slot.reported_depth, slot.loads = seen.queue_depth, seen.loads
            slot.backend, slot.backend_note = seen.backend, seen.backend_note
        self._first_states.set()

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._send(wire.Hello(self.identity))  # the front's heartbeat
            if self._pending and time.monotonic() - self._heard > ENGINE_SILENT_S:
                log.error("the engine has not answered for %.0f s; failing what waits on it", ENGINE_SILENT_S)
                self._fail_pending(ModelUnavailable("the model engine is not answering; retry", retry_after=5))

    def _fail_pending(self, error: ServiceError) -> None:
        pending, self._pending = self._pending, {}
        self._listeners.clear()
        for future, _ in pending.values():
            if not future.done():
                future.set_exception(error)

    # -- what only a front needs -----------------------------------------------------------

    async def refresh(self) -> None:
        """The engine's states as of now (the mirror may be up to a heartbeat old)."""
        self._mirror(msgspec.convert(await self._call("states"), wire.States))

    async def get_or_load(self, name: str) -> ModelSlot:
        slot = await super().get_or_load(name)
        slot.state = ModelState.loaded  # the engine's next States says more
        return slot

    async def unload(self, name: str) -> bool:
        unloaded = await super().unload(name)
        self.slot(name).state = ModelState.not_loaded
        return unloaded

    async def metrics(self, openmetrics: bool = False) -> bytes:
        """Every process's metrics, merged by the engine."""
        text: str = await self._call("metrics", openmetrics)
        return text.encode()
