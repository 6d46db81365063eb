"""``python -m app serve`` with ``TESSERA_WORKERS`` > 0: one engine process and that many
front processes, started, watched and stopped by this one (the supervisor).

- The engine (``python -m app engine``) holds the registry and the models
  (app/engine/core.py) behind an ``ipc://`` socket in a private directory (app/engine/server.py); it ignores Ctrl-C
  and stops on the supervisor's SIGTERM only, after every front has.
- Each front (``python -m app front``: app/serving.py's ``run_front``) is the HTTP app
  (its server drains on SIGTERM) on its own listening socket bound to the shared port
  with ``SO_REUSEPORT``: the kernel spreads connections over the fronts.
- SIGTERM (or Ctrl-C) to the supervisor drains the fronts first (readiness 503, requests in
  flight finish), then stops the engine; the supervisor exits 0. A front that dies is
  started again; an engine that dies stops everything with status 1, for the orchestrator
  to restart the whole (no front can answer without it).
- Each child dies with the supervisor (PR_SET_PDEATHSIG), so a killed supervisor leaves no
  orphan holding the port or the model memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

from app.config import Settings

if TYPE_CHECKING:  # the supervisor itself runs no model: it imports neither torch nor the engine
    from app.engine.server import EngineServer
    from app.metrics import Metrics

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
FRONT_RESTART_S = 1.0  # a front that keeps dying is started again at most this often
ENGINE_STOP_S = 60.0  # after the fronts, how long the engine has to unload its models


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket on the shared port, one per front: the kernel balances connections over them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


# -- the engine process ----------------------------------------------------------------------


def run_engine(settings: Settings, address: str) -> None:
    """The engine's life: the registry and its preloads, served on ``address`` until SIGTERM."""
    import uvloop

    from app import heap
    from app.engine.startup import tune_process

    tune_process(settings)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to act on
    with heap.young_collections_spaced_out():
        uvloop.run(_engine(settings, address))


async def _engine(settings: Settings, address: str) -> None:
    from app import heap

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    # What start-up built lives as long as the process (app/heap.py, as app/serving.py does).
    await serve_engine(settings, address, stop, lambda core: heap.freeze_survivors(), heap.collect_all)


async def serve_engine(
    settings: Settings,
    address: str,
    stop: asyncio.Event,
    started: Callable[[EngineServer], object] | None = None,
    on_models_changed: Callable[[], None] | None = None,
) -> None:
    """The engine (its preload models loading) served on ``address`` until ``stop`` is set;
    ``started`` sees the server once it listens (the tests drive an engine this way), and
    ``on_models_changed`` is the process's garbage collector's (app/heap.py)."""
    from app import tracing  # at run time too, in the engine alone
    from app.metrics import Metrics

    metrics = Metrics()
    traced = tracing.configure(settings, "engine")  # the engine's own spans, flushed as it stops
    try:
        await _serve(settings, address, stop, metrics, started, on_models_changed)
    finally:
        if traced:
            tracing.release()


async def _serve(
    settings: Settings,
    address: str,
    stop: asyncio.Event,
    metrics: Metrics,
    started: Callable[[EngineServer], object] | None,
    on_models_changed: Callable[[], None] | None,
) -> None:
    from app.engine.server import EngineServer
    from app.engine.startup import open_engine
    from app.metrics import exposition, merge_expositions
    from app.registry.inferred import catalog_of

    core = await open_engine(settings, catalog_of(settings), metrics, on_models_changed)
    server = EngineServer(
        core,
        address,
        exposition=lambda openmetrics: exposition(metrics.registry, openmetrics),
        merge=lambda texts, openmetrics: merge_expositions(texts, label="process", openmetrics=openmetrics),
    )
    server.start()
    core.start()
    if started is not None:
        started(server)
    await stop.wait()
    log.info("engine: stopping")
    await core.close()
    await server.close()


# -- the supervisor ----------------------------------------------------------------------------


class Supervisor:
    """Starts the engine and ``workers`` fronts, keeps the fronts up, stops them in order."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.workers = settings.front_processes
        self.dir = tempfile.mkdtemp(prefix="tessera-")
        self.address = f"ipc://{self.dir}/engine"
        self.engine: subprocess.Popen[bytes] | None = None
        self.fronts: dict[int, subprocess.Popen[bytes]] = {}
        self.stopping = False

    def _spawn(self, *args: str) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "app", *args, "--address", self.address]
        # The command line's host and port (python -m app serve --port) reach the children too.
        env = {**os.environ, "TESSERA_HOST": self.settings.host, "TESSERA_PORT": str(self.settings.port)}
        return subprocess.Popen(command, env=env, preexec_fn=_die_with_parent, start_new_session=True)

    def run(self) -> int:
        # Held (not listening) while serving: the port fails fast if taken, and stays ours.
        reserved = listening_socket(self.settings.host, self.settings.port)
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.engine = self._spawn("engine")
            for index in range(self.workers):
                self.fronts[index] = self._spawn("front", "--index", str(index))
            log.info(
                "serving on %s:%d with %d front processes and an engine (pid %d)",
                self.settings.host,
                self.settings.port,
                self.workers,
                self.engine.pid,
            )
            return self._watch()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._stop_all()
            reserved.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _stop(self, sig: int, frame: FrameType | None) -> None:
        if self.stopping:
            log.warning("second stop signal: stopping now")
            for child in [*self.fronts.values(), self.engine]:
                if child is not None:
                    with contextlib.suppress(ProcessLookupError):
                        child.kill()
            return
        log.info("%s: draining the fronts, then stopping the engine", signal.Signals(sig).name)
        self.stopping = True

    def _watch(self) -> int:
        restarted: dict[int, float] = {}
        while not self.stopping:
            time.sleep(0.2)
            assert self.engine is not None
            if self.engine.poll() is not None:
                log.critical("the engine exited with status %s; stopping the fronts", self.engine.returncode)
                return 1
            for index, front in list(self.fronts.items()):
                if front.poll() is not None and not self.stopping:
                    if time.monotonic() - restarted.get(index, 0.0) < FRONT_RESTART_S:
                        continue
                    log.error("front %d exited with status %s; starting it again", index, front.returncode)
                    restarted[index] = time.monotonic()
                    self.fronts[index] = self._spawn("front", "--index", str(index))
        return 0

    def _stop_all(self) -> None:
        """The fronts drain first (their requests need the engine), then the engine stops."""
        fronts = [f for f in self.fronts.values() if f.poll() is None]
        for front in fronts:
            front.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.drain_timeout_s + 10
        for front in fronts:
            try:
                front.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("front pid %d did not stop; killing it", front.pid)
                front.kill()
        engine = self.engine
        if engine is not None and engine.poll() is None:
            engine.send_signal(signal.SIGTERM)
            try:
                engine.wait(ENGINE_STOP_S)
            except subprocess.TimeoutExpired:
                log.warning("the engine did not stop; killing it")
                engine.kill()


def supervise(settings: Settings) -> int:
    return Supervisor(settings).run()
