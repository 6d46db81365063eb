"""The limits every request meets, whatever route it came through: inputs per request,
characters per input, generation caps, deadlines, and each tenant's rate."""

from __future__ import annotations

import math
import time
from typing import Protocol

from app.config import Settings
from app.errors import InputTooLarge, InvalidInput, Overloaded
from app.service.types import GenerationSettings


def check_inputs(settings: Settings, texts: list[str]) -> None:
    if len(texts) > settings.max_inputs_per_request:
        raise InputTooLarge(
            f"{len(texts)} inputs in one request; the limit is {settings.max_inputs_per_request} "
            "(TESSERA_MAX_INPUTS_PER_REQUEST): split the request"
        )
    for i, text in enumerate(texts):
        if len(text) > settings.max_chars_per_input:
            raise InputTooLarge(
                f"input {i} has {len(text)} characters; the limit is {settings.max_chars_per_input} "
                "(TESSERA_MAX_CHARS_PER_INPUT)"
            )


def check_generation(settings: Settings, generation: GenerationSettings) -> None:
    asked = dict(generation)
    caps = {
        "max_new_tokens": settings.max_new_tokens_cap,
        "max_length": settings.max_new_tokens_cap,
        "num_beams": settings.max_num_beams,
    }
    for name, cap in caps.items():
        if name in asked and asked[name] > cap:
            raise InvalidInput(f"{name} {asked[name]} is over this server's cap of {cap}")


def timeout_of(settings: Settings, requested: float | None) -> float:
    return min(requested or settings.request_timeout_s, settings.max_request_timeout_s)


class Limiter(Protocol):
    """Takes a request's inputs from its tenant's rate, or raises Overloaded."""

    async def take(self, tenant: str, inputs: int) -> None: ...


class RateLimit:
    """Per tenant, a bucket of inputs refilled at ``rate`` per second up to ``burst``: a request
    takes one per input, or is refused with 429 and the seconds until it would fit."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (inputs left, when)

    async def take(self, tenant: str, inputs: int) -> None:
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
