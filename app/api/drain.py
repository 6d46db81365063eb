"""Graceful shutdown: while a server drains, requests in flight finish and new ones are refused.

``Drain`` counts the requests in flight (the request middleware reports each one) and,
once ``start`` is called, has the middleware answer every new request but health and
metrics with 503 + Retry-After and ``Connection: close``, so that a load balancer retries
elsewhere while readiness reports ``draining``. Who calls ``start`` is the process's
business: ``python -m app serve`` does on SIGTERM, then stops the server once
``wait_idle`` returns (or its grace period ends) and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib

# What a client refused during a drain should wait before trying again (another replica
# is normally there to answer by then).
RETRY_AFTER_S = 1
# Paths answered during a drain: probes, and the metrics that show the drain.
ANSWERED_WHILE_DRAINING = ("/health/", "/metrics")


class Drain:
    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle: asyncio.Event | None = None

    def start(self) -> None:
        self.draining = True

    def refuses(self, path: str) -> bool:
        return self.draining and not path.startswith(ANSWERED_WHILE_DRAINING)

    def began(self) -> None:
        self.in_flight += 1
        if self._idle is not None:
            self._idle.clear()

    def ended(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Whether every request in flight finished within ``timeout`` seconds."""
        if self.in_flight == 0:
            return True
        self._idle = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        return self.in_flight == 0
