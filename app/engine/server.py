"""The engine process's transport: an EngineCore (app/engine/core.py) behind a ZeroMQ ROUTER
socket, for the front processes' ZmqClient (app/engine/zmq_client.py).

A frame of operations costs the engine one read and one decode, and the events for one
front that are ready by the end of a loop turn leave in one frame. Beyond what the core
does, the server keeps track of the fronts (their heartbeats), sends them the catalog's
states on every change and every second, and gathers their metrics for a scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Hashable
from typing import Any

import zmq

from app.engine import wire
from app.engine.core import EngineCore

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0  # States go to every front this often, and at once after a change
TICK_S = 0.2  # how often the engine looks for a change of state to send
FRONT_SILENT_S = 30.0  # a front not heard from for this long is forgotten (see ENGINE_SILENT_S)
EXPOSE_WAIT_S = 1.0  # how long a metrics scrape waits for the fronts' own metrics


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


class EngineServer:
    """Serves ``core`` to the fronts on ``address`` (an ``ipc://`` path) until closed."""

    def __init__(
        self,
        core: EngineCore,
        address: str,
        *,
        exposition: Callable[[bool], bytes],
        merge: Callable[[dict[str, str], bool], str],
    ) -> None:
        self.core = core
        self.address = address
        self.exposition = exposition
        self.merge = merge
        self.fronts: dict[bytes, float] = {}  # identity -> when last heard from
        self._outbox: dict[bytes, list[Any]] = {}
        self._flushing = False
        self._exposes: dict[int, _Gathering] = {}
        self._expose_ids = itertools.count()
        self._sent_states: bytes = b""
        self._socket: zmq.Socket[bytes] | None = None
        self._ticker: asyncio.Task[None] | None = None
        core.deliver = self._send  # origins here are front identities
        core.on_states_changed = self._send_states_if_changed
        core.calls["metrics"] = self._metrics

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
        if self._socket is not None:
            self._flush()  # what the core answered as it stopped
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
                if isinstance(op, wire.Hello):
                    self._send(front, self.core.states())
                elif isinstance(op, wire.Exposition):
                    gathering = self._exposes.get(op.rid)
                    if gathering is not None:  # "front-0/<pid>": front-0
                        gathering.add(front.decode().partition("/")[0], op.text)
                else:
                    self.core.handle(front, op)

    def _send(self, front: Hashable, event: Any) -> None:
        assert isinstance(front, bytes)
        self._outbox.setdefault(front, []).append(event)
        if not self._flushing:
            self._flushing = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        outbox, self._outbox = self._outbox, {}
        sock = self._socket
        if sock is None:
            return
        for front, events in outbox.items():
            with contextlib.suppress(zmq.ZMQError):  # a front that left: nobody to answer
                sock.send_multipart((front, wire.encode(events)), zmq.NOBLOCK)
        # The socket's descriptor signals edges: a frame that came in while sending would
        # otherwise wait for the next one.
        self._readable()

    async def _metrics(self, openmetrics: bool = False) -> str:
        """The engine's metrics and every live front's, each sample labelled with its process."""
        rid = next(self._expose_ids)
        fronts = list(self.fronts)
        gathering = self._exposes[rid] = _Gathering(len(fronts))
        for front in fronts:
            self._send(front, wire.Expose(rid, openmetrics))
        try:
            with contextlib.suppress(TimeoutError):  # a front that died meanwhile is left out
                await asyncio.wait_for(gathering.complete.wait(), EXPOSE_WAIT_S)
        finally:
            del self._exposes[rid]
        texts = {"engine": self.exposition(openmetrics).decode(), **dict(sorted(gathering.texts.items()))}
        return self.merge(texts, openmetrics)

    def _send_states_if_changed(self, always: bool = False) -> None:
        states = self.core.states()
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
