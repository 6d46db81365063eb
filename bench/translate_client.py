"""A closed-loop ``/translate`` client (asyncio + httpx) that times each answer's first token.

``concurrency`` clients each send one request at a time until the requests run out. Where
the server streams (probed once: a 200 ``text/event-stream`` answer to ``"stream": true``),
each request is streamed and its time to first token is its first ``delta`` event; else
each is sent as a plain JSON request and its time to first token is its full latency. The
stream's events, one per blank-line-separated block::

    event: delta   data: {"index": i, "text": "...", "tokens": n}
    event: final   data: {"index": i, "text": "<full>", "truncated": bool}
    event: done    data: {...}
    event: error   data: {"error": ..., "message": ...}     (the request failed)

httpx costs about 1 ms of client CPU per request (bench/README.md): next to requests that
take seconds to generate, that is small.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import httpx

TIMEOUT_S = 600.0


@dataclass
class Answer:
    """One request's outcome: its cap, its text (ok) or why it failed, and its timings."""

    cap: int
    ok: bool
    text: str = ""
    ttft_s: float = 0.0
    latency_s: float = 0.0
    error: str = ""


class EventStream:
    """Server-sent events from a stream's lines (without line ends): ``feed`` returns the
    (event, data) pair that a blank line completes."""

    def __init__(self) -> None:
        self.event = "message"
        self.data: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        if line.startswith("event:"):
            self.event = line[6:].strip()
        elif line.startswith("data:"):
            self.data.append(line[5:].removeprefix(" "))
        elif not line:
            return self.close()
        return None

    def close(self) -> tuple[str, str] | None:
        """The event the stream ended in, if it ended without a blank line."""
        done = (self.event, "\n".join(self.data)) if self.data else None
        self.event, self.data = "message", []
        return done


async def probe(url: str, body: dict[str, Any]) -> tuple[bool, str]:
    """Whether the server streams ``body`` sent with ``"stream": true``, and what it answered
    (a server without streaming refuses the field, 422, or ignores it and answers JSON)."""
    async with (
        httpx.AsyncClient(base_url=url, timeout=TIMEOUT_S) as client,
        client.stream("POST", "/translate", json={**body, "stream": True}) as response,
    ):
        await response.aread()
        kind = response.headers.get("content-type", "")
        if response.status_code == 200 and kind.startswith("text/event-stream"):
            return True, "200 text/event-stream"
        return False, f"{response.status_code} {kind.split(';')[0]}: {response.text[:120]}"


async def send_streamed(client: httpx.AsyncClient, body: dict[str, Any], cap: int) -> Answer:
    start = time.perf_counter()
    first: float | None = None
    final: str | None = None
    try:
        async with client.stream("POST", "/translate", json={**body, "stream": True}) as response:
            if response.status_code != 200:
                await response.aread()
                return Answer(cap, False, error=f"{response.status_code}: {response.text[:200]}")
            stream = EventStream()
            async for line in response.aiter_lines():
                got = stream.feed(line)
                if got is None:
                    continue
                event, data = got
                if event == "delta" and first is None:
                    first = time.perf_counter() - start
                elif event == "final":
                    final = json.loads(data)["text"]
                elif event == "error":
                    return Answer(cap, False, error=f"error event: {data[:200]}")
            if stream.close() is not None:
                return Answer(cap, False, error="the stream ended inside an event")
    except httpx.HTTPError as exc:
        return Answer(cap, False, error=f"{type(exc).__name__}: {exc}")
    latency = time.perf_counter() - start
    if final is None:
        return Answer(cap, False, error="the stream ended without a final event")
    return Answer(cap, True, final, latency if first is None else first, latency)


async def send_plain(client: httpx.AsyncClient, body: dict[str, Any], cap: int) -> Answer:
    start = time.perf_counter()
    try:
        response = await client.post("/translate", json=body)
    except httpx.HTTPError as exc:
        return Answer(cap, False, error=f"{type(exc).__name__}: {exc}")
    latency = time.perf_counter() - start
    if response.status_code != 200:
        return Answer(cap, False, error=f"{response.status_code}: {response.text[:200]}")
    return Answer(cap, True, response.json()["results"][0]["translation_text"], latency, latency)


async def closed_loop(
    url: str, requests: list[tuple[int, dict[str, Any]]], concurrency: int, streamed: bool
) -> tuple[list[Answer], float]:
    """Send ``requests`` ((cap, body) pairs), ``concurrency`` at a time, each client waiting
    for its answer before the next: the answers in request order and the wall time."""
    answers: list[Answer | None] = [None] * len(requests)
    send = send_streamed if streamed else send_plain
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=TIMEOUT_S) as client:
        indices = iter(range(len(requests)))

        async def one_client() -> None:
            for i in indices:  # shared: each index goes to one client
                cap, body = requests[i]
                answers[i] = await send(client, body, cap)

        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return [a for a in answers if a is not None], wall
