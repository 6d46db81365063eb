"""What ``python -m app serve`` runs: the app with the process's own knobs, under a uvicorn
server that drains on SIGTERM and exits 0.

The knobs belong to the process, not the app, so they are turned here, where the process
is ours: the garbage collector's (app/heap.py: the long-lived heap frozen after start-up
and after each model load or unload, young collections spaced out while serving), glibc
malloc's free pages (app/heap.py: handed back when the process goes quiet, so that
tensors of varied shapes do not pile up as fragments; a process that runs models only), the
tokenizers' own thread pool (off: the lanes already tokenize in parallel, and waking the
pool for every small batch cost 3 % of throughput in-process at c=64, bench/batcher_only.py)
and torch's thread count (TESSERA_TORCH_THREADS).

uvicorn, told to stop, closes its listening socket at once and, once done, re-raises the
signal, so the process ends with SIGTERM's status. A rolling update wants better: on
SIGTERM (or Ctrl-C) the app's ``Drain`` starts (readiness answers 503, new requests are
refused with 503 + Retry-After), requests in flight finish within ``drain_timeout_s``,
then uvicorn shuts down as usual (models unloaded) and the process exits 0. A second
signal stops at once. This is the entry point's business, not the app's: the signal
handlers are the process's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator
from types import FrameType

import uvicorn
from fastapi import FastAPI

from app import heap
from app.api.drain import Drain
from app.cluster import ReplicaAgent
from app.config import Settings
from app.engine.processes import listening_socket
from app.engine.startup import tune_process
from app.main import Front, create_app

log = logging.getLogger(__name__)

HANDLED = (signal.SIGINT, signal.SIGTERM)
# Once drained, how long uvicorn waits for idle keep-alive connections to close.
CLOSE_CONNECTIONS_S = 5


def run_front(settings: Settings, address: str, index: int) -> None:
    """A front process (app/engine/processes.py): the app with the engine's client, on its own
    socket on the shared port."""
    app = build(settings, engine=Front(address, f"front-{index}"))
    run(app, settings, sockets=[listening_socket(settings.host, settings.port)])


def build(settings: Settings, cluster: ReplicaAgent | None = None, engine: Front | None = None) -> FastAPI:
    """The app as the serve entry point runs it (also a Ray Serve replica, app/ray_serve.py,
    and a front process, app/engine/processes.py): the knobs of a process that runs models
    turned (not a front's), then create_app."""
    if engine is None:
        tune_process(settings)
    return create_app(settings, on_models_changed=heap.collect_all, cluster=cluster, engine=engine)


def run(app: FastAPI, settings: Settings, sockets: list[socket.socket] | None = None) -> None:
    """Serve until SIGTERM (drained) or a second signal, young collections spaced out meanwhile;
    on ``sockets`` if given (a front's, on the shared port), else on the settings' host and port."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
    )
    with heap.young_collections_spaced_out():
        DrainingServer(config, app.state.drain, settings.drain_timeout_s).run(sockets=sockets)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: Drain, drain_timeout_s: float) -> None:
        config.timeout_graceful_shutdown = CLOSE_CONNECTIONS_S
        super().__init__(config)
        self.drain = drain
        self.drain_timeout_s = drain_timeout_s
        self._draining: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        heap.freeze_survivors()  # what start-up built lives as long as the process

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, without re-raising the signal at the end: a drained server exits 0."""
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain.draining or not self.started:
            log.warning("second stop signal (or one during start-up): stopping now")
            self.force_exit = self.should_exit
            self.should_exit = True
            return
        self.drain.start()
        loop = asyncio.get_event_loop()
        self._draining = loop.create_task(self._drain(signal.Signals(sig).name))

    async def _drain(self, name: str) -> None:
        log.info(
            "%s: draining (%d requests in flight; new ones answer 503) for up to %.0f s",
            name,
            self.drain.in_flight,
            self.drain_timeout_s,
        )
        if await self.drain.wait_idle(self.drain_timeout_s):
            log.info("drained: every request in flight finished")
        else:
            log.warning("drain timed out with %d requests in flight; stopping anyway", self.drain.in_flight)
        self.should_exit = True
