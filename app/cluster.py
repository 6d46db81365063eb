"""One server over many replicas: model management and metrics that hold cluster-wide.

A replica is one Tessera app (one process, its own models and batchers). Behind a router
that spreads requests (Ray Serve's proxy: app/ray_serve.py), what one replica does alone
would be wrong for the cluster: a model loaded through the API would be loaded on one
replica of N, and /metrics would answer one replica's counters. So the replicas share a
``Coordinator``: the model commands given through the API (load X, unload Y) in order,
and each replica's report of what it applied. A replica long-polls it (``poll``) and
applies each new command to its own registry; a command through the API returns once
every live replica has applied it, with each replica's resulting state. A replica that
starts later (scale-up, a replacement) applies the commands before it takes traffic, so
the cluster stays consistent. /metrics asks every live replica for its exposition through
the same poll and answers them all, each sample labelled with its ``replica``.

Nothing here imports Ray: the coordinator is plain asyncio and reaches replicas only
through their polls, so it runs as a Serve deployment, and in tests in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from app.metrics import merge_expositions

log = logging.getLogger(__name__)

POLL_S = 5.0  # a replica's long poll returns at least this often
LIVE_S = 3 * POLL_S  # a replica not heard from for this long is gone (killed, partitioned)


@dataclass
class _Replica:
    seen: float
    version: int = 0  # the last command version it applied
    states: dict[str, dict[str, Any]] = field(default_factory=dict)  # model -> {"state", "error"}
    metrics_seq: int = 0
    metrics: str = ""


class Coordinator:
    """The cluster's model commands and the replicas' reports; one per deployment."""

    def __init__(self) -> None:
        self.version = 0
        self.commands: dict[str, tuple[bool, int]] = {}  # model -> (loaded, version): the latest command
        self.metrics_seq = 0
        self.replicas: dict[str, _Replica] = {}
        self.changed = asyncio.Condition()

    def _live(self) -> dict[str, _Replica]:
        now = time.monotonic()
        return {rid: r for rid, r in self.replicas.items() if now - r.seen < LIVE_S}

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def poll(self, replica: str, version: int, metrics_seq: int, timeout_s: float = POLL_S) -> dict[str, Any]:
        """Returns at once if there are commands this replica has not applied or a metrics
        collection it has not answered, else when there are, or after ``timeout_s``."""
        entry = self.replicas.setdefault(replica, _Replica(seen=time.monotonic()))
        entry.seen = time.monotonic()

        def news() -> bool:
            return self.version > version or self.metrics_seq > metrics_seq

        async with self.changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait_for(news), timeout_s)
        entry.seen = time.monotonic()
        return {"version": self.version, "commands": dict(self.commands), "metrics_seq": self.metrics_seq}

    async def report(self, replica: str, version: int, states: dict[str, dict[str, Any]]) -> None:
        entry = self.replicas.setdefault(replica, _Replica(seen=time.monotonic()))
        entry.seen, entry.version, entry.states = time.monotonic(), max(entry.version, version), states
        await self._notify()

    async def post_metrics(self, replica: str, seq: int, text: str) -> None:
        entry = self.replicas.setdefault(replica, _Replica(seen=time.monotonic()))
        entry.seen, entry.metrics_seq, entry.metrics = time.monotonic(), seq, text
        await self._notify()

    async def leave(self, replica: str) -> None:
        self.replicas.pop(replica, None)
        await self._notify()

    async def command(self, model: str, loaded: bool, timeout_s: float) -> dict[str, dict[str, Any]]:
        """Load or unload ``model`` on every replica; each live replica's state for it once all
        have applied the command (or ``timeout_s`` passed: those behind say ``pending``)."""
        self.version += 1
        version = self.version
        self.commands[model] = (loaded, version)
        await self._notify()
        await self._wait(lambda: all(r.version >= version for r in self._live().values()), timeout_s)
        return {
            rid: r.states.get(model, {"state": "unknown"}) if r.version >= version else {"state": "pending"}
            for rid, r in sorted(self._live().items())
        }

    async def collect_metrics(self, timeout_s: float) -> dict[str, str]:
        """Every live replica's Prometheus exposition, asked for now."""
        self.metrics_seq += 1
        seq = self.metrics_seq
        await self._notify()
        await self._wait(lambda: all(r.metrics_seq >= seq for r in self._live().values()), timeout_s)
        return {rid: r.metrics for rid, r in sorted(self._live().items()) if r.metrics_seq >= seq}

    async def members(self) -> list[str]:
        return sorted(self._live())

    async def _wait(self, done: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        async with self.changed:
            # Wakes on every report, and at least every second: a replica that died is
            # dropped from the live set by time alone.
            while not done() and (left := deadline - time.monotonic()) > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), min(left, 1.0))


Call = Callable[..., Awaitable[Any]]


class ReplicaAgent:
    """A replica's side: applies the coordinator's commands to its registry and answers its
    metrics collections. ``call(method, *args)`` reaches the coordinator (a Serve handle's
    method, or the object itself in tests)."""

    def __init__(self, call: Call, replica: str) -> None:
        self.call = call
        self.replica = replica
        self.version = 0
        self.metrics_seq = 0
        self._task: asyncio.Task[None] | None = None
        self._applying: set[asyncio.Task[None]] = set()

    async def start(self, registry: Any, exposition: Callable[[], bytes]) -> None:
        """Apply the commands given so far (before this replica takes traffic), then follow."""
        self.registry, self.exposition = registry, exposition
        news = await self.call("poll", self.replica, 0, 0, 0.0)
        self.metrics_seq = news["metrics_seq"]  # collections before it started are not its own
        await self._apply(news)
        self.version = news["version"]
        self._task = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await asyncio.wait_for(self.call("leave", self.replica), 5)
        except Exception as exc:  # the coordinator may be gone first; it forgets us by time
            log.info("could not leave the coordinator: %s", exc)

    async def _follow(self) -> None:
        while True:
            try:
                news = await self.call("poll", self.replica, self.version, self.metrics_seq, POLL_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a restarting coordinator: try again shortly
                log.warning("cluster coordinator unreachable (%s); retrying", exc)
                await asyncio.sleep(1)
                continue
            if news["metrics_seq"] > self.metrics_seq:
                self.metrics_seq = news["metrics_seq"]
                text = self.exposition().decode()
                await self.call("post_metrics", self.replica, self.metrics_seq, text)
            if news["version"] > self.version:
                task = asyncio.create_task(self._apply(news, self.version))  # a load may take long
                self._applying.add(task)
                task.add_done_callback(self._applying.discard)
                self.version = news["version"]

    async def _apply(self, news: dict[str, Any], applied: int = 0) -> None:
        """The commands newer than ``applied`` (a replica that starts applies them all)."""
        for model, (loaded, version) in news["commands"].items():
            if version <= applied:
                continue  # done already: unloading again would drop what traffic has loaded since
            try:
                if loaded:
                    await self.registry.get_or_load(model)
                else:
                    await self.registry.unload(model)
            except Exception as exc:  # the state and its error are what the command reports
                log.warning("cluster command %s %s failed here: %s", "load" if loaded else "unload", model, exc)
        states = {}
        for slot in self.registry.slots():
            states[slot.entry.name] = {"state": slot.state.value, "error": slot.error}
        await self.call("report", self.replica, news["version"], states)

    async def set_loaded(self, model: str, loaded: bool, timeout_s: float) -> dict[str, dict[str, Any]]:
        states: dict[str, dict[str, Any]] = await self.call("command", model, loaded, timeout_s)
        return states

    async def metrics(self, timeout_s: float = 10.0) -> bytes:
        texts: dict[str, str] = await self.call("collect_metrics", timeout_s)
        return merge_expositions(texts).encode()
