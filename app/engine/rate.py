"""Each tenant's rate of inputs, held by the engine: one bucket per tenant, whichever front
or route a request came through."""

from __future__ import annotations

import math
import time

from app.config import Settings
from app.errors import Overloaded


class RateLimit:
    """Per tenant, a bucket of inputs refilled at ``rate`` per second up to ``burst``: a request
    takes one per input, or is refused with 429 and the seconds until it would fit."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (inputs left, when)

    def take(self, tenant: str, inputs: int) -> None:
        now = time.monotonic()
        left, then = self._buckets.get(tenant, (self.burst, now))
        left = min(self.burst, left + (now - then) * self.rate)
        if inputs > left:
            wait = (inputs - left) / self.rate
            raise Overloaded(
                f"rate limit: {self.rate:g} inputs per second for '{tenant}' (TESSERA_RATE_LIMIT_INPUTS_PER_S); "
                f"this request of {inputs} fits in {wait:.1f} s",
                retry_after=math.ceil(wait),
            )
        self._buckets[tenant] = (left - inputs, now)
        if len(self._buckets) > 10_000:  # forget tenants whose buckets have refilled
            full = [t for t, (n, at) in self._buckets.items() if n + (now - at) * self.rate >= self.burst]
            for t in full:
                del self._buckets[t]


def rate_limit_of(settings: Settings) -> RateLimit | None:
    rate = settings.rate_limit_inputs_per_s
    if rate is None:
        return None
    return RateLimit(rate, settings.rate_limit_burst or max(rate, settings.max_inputs_per_request))
