"""Fairness between tenants (API keys, or client addresses without keys): who is admitted
when a model's queue is full, and whose input seeds its next batch.

Start-time fair queueing (Goyal, Vin and Cheng, 1996): each input gets a virtual start tag,
the later of the system's virtual time and its tenant's last finish tag, and its tenant's
finish tag moves on by the input's cost (its tokens). The next batch is seeded by the input
with the smallest start tag, so a tenant that sends little is served ahead of a flooder's
backlog, while a lone tenant's inputs keep their arrival order (its tags only grow).
A full queue still admits a tenant that holds less than an equal share of it; the 429 goes
to the tenants at or above their share (so the queue holds at most twice its limit).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Any


class FairShares:
    """Virtual time and per-tenant finish tags and queue depths of one model's queue; its
    owner (the batcher) calls every method holding its lock."""

    def __init__(self) -> None:
        self.virtual = 0.0
        self._finish: dict[Hashable, float] = {}
        self.depth: Counter[Hashable] = Counter()

    def admits(self, tenant: Hashable, count: int, queued: int, limit: int) -> bool:
        """Whether ``count`` more inputs of ``tenant`` may queue beside ``queued`` others."""
        if queued + count <= limit:
            return True
        others = sum(1 for t, depth in self.depth.items() if depth > 0 and t != tenant)
        return self.depth[tenant] + count <= limit / (others + 1)

    def queued(self, tenant: Hashable, count: int) -> None:
        self.depth[tenant] += count

    def left(self, tenant: Hashable) -> None:
        self.depth[tenant] -= 1
        if self.depth[tenant] <= 0:
            del self.depth[tenant]

    def tag(self, item: Any) -> None:
        """Give a tokenized input its start tag (``item.start``), from its tenant and its cost."""
        start = max(self.virtual, self._finish.get(item.tenant, 0.0))
        item.start = start
        self._finish[item.tenant] = start + item.cost

    def served(self, batch: Sequence[Any]) -> None:
        """A batch was formed: virtual time moves to its seed's start tag."""
        self.virtual = max(self.virtual, min(item.start for item in batch))
        # A tenant whose last finish is behind virtual time starts from virtual time anyway.
        for tenant in [t for t, finish in self._finish.items() if finish <= self.virtual]:
            del self._finish[tenant]
