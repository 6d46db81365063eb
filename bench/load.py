"""The HTTP load driver and the numbers every method reports.

``drive`` keeps ``concurrency`` requests in flight, one text each, over keep-alive HTTP/1.1
connections (a minimal asyncio protocol on uvloop: 0.06 ms of client CPU per request,
where httpx took 1.0 ms, which on 2 shared cores was a tenth of the server's budget), and
records each request's latency and the client's own CPU time; a request that does not
answer 200 counts as an error, never as a result.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import uvloop


@dataclass
class Measurement:
    """One method's timed run over a list of texts."""

    method: str
    texts: int
    seconds: float
    latencies_s: list[float] = field(default_factory=list, repr=False)
    errors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.texts / self.seconds if self.seconds > 0 else 0.0

    def percentile_ms(self, q: float) -> float | None:
        if not self.latencies_s:
            return None
        ordered = sorted(self.latencies_s)
        index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
        return ordered[index] * 1000

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "latencies_s"}
        out["texts_per_s"] = round(self.throughput, 2)
        for q in (50, 95, 99):
            value = self.percentile_ms(q)
            out[f"p{q}_ms"] = None if value is None else round(value, 2)
        return out


def ms_per(seconds: float, count: int) -> float:
    return round(1000 * seconds / count, 3) if count else 0.0


def merge(runs: list[Measurement]) -> Measurement:
    """Rounds of one method as one measurement: texts, seconds and counts add up, latencies
    pool, and per-text figures (CPU ms per text) average over the rounds, weighted by texts."""
    first = runs[0]
    merged = Measurement(first.method, 0, 0.0, extra=dict(first.extra))
    for run in runs:
        merged.texts += run.texts
        merged.seconds += run.seconds
        merged.latencies_s += run.latencies_s
        merged.errors += run.errors
    for key, value in first.extra.items():
        if key in ("batches", "items"):
            merged.extra[key] = sum(r.extra[key] for r in runs)
        elif key.endswith("_per_text") and isinstance(value, dict):
            merged.extra[key] = {k: _weighted([(r.extra[key][k], r.texts) for r in runs]) for k in value}
        elif key.endswith("_per_text"):
            merged.extra[key] = _weighted([(r.extra[key], r.texts) for r in runs])
    if merged.extra.get("batches"):
        merged.extra["mean_batch_size"] = round(merged.extra["items"] / merged.extra["batches"], 2)
    merged.extra["rounds"] = len(runs)
    merged.extra["round_texts_per_s"] = [round(r.throughput, 2) for r in runs]
    return merged


def _weighted(pairs: list[tuple[float, int]]) -> float:
    total = sum(weight for _, weight in pairs)
    return round(sum(value * weight for value, weight in pairs) / total, 3) if total else 0.0


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that sends a request and reads one response.

    The load generator shares the cores it measures, so it is as lean as a load
    generator can be in Python: request bytes are built before the clock starts, and a
    response is parsed only as far as its status and Content-Length.
    """

    def __init__(self) -> None:
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, dict[str, str], bytes]] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"the server closed the connection: {exc}"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0 or self.waiter is None:
            return
        head = bytes(self.buffer[:head_end]).decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in head[1:])}
        length = headers.get("content-length")
        if length is None:
            self.waiter.set_exception(ConnectionError(f"a response without Content-Length: {head[0]}"))
            return
        end = head_end + 4 + int(length)
        if len(self.buffer) < end:
            return
        body = bytes(self.buffer[head_end + 4 : end])
        del self.buffer[:end]
        self.waiter.set_result((int(head[0].split()[1]), headers, body))

    async def request(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send one request; its status, headers (lower-case names) and body."""
        if self.closed:  # a write on a closed transport is dropped silently: nothing would answer
            raise ConnectionError("the server closed this connection")
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        try:
            return await self.waiter
        finally:
            self.waiter = None


def _raw_post(host: str, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> bytes:
    payload = json.dumps(body).encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


async def _drive(
    base_url: str,
    path: str,
    bodies: list[dict[str, Any]],
    concurrency: int,
    warmup: int,
    stats_path: str | None,
    timeout_s: float,
    headers: dict[str, str] | None = None,
) -> tuple[float, float, list[float], int, str | None, list[Any]]:
    latencies = [0.0] * len(bodies)
    errors = 0
    first_error: str | None = None
    url = httpx.URL(base_url)
    host, port = url.host, url.port or 80
    raw = [_raw_post(f"{host}:{port}", path, body, headers) for body in bodies]
    loop = asyncio.get_running_loop()
    connections = [(await loop.create_connection(_Connection, host, port))[1] for _ in range(concurrency)]

    async def worker(slot: int, queue: Any, record: bool) -> None:
        nonlocal errors, first_error
        for i in queue:
            if connections[slot].closed:  # idle past the server's keep-alive timeout (uvicorn's: 5 s)
                connections[slot] = (await loop.create_connection(_Connection, host, port))[1]
            started = time.perf_counter()
            status, _, body = await connections[slot].request(raw[i])
            elapsed = time.perf_counter() - started
            if status != 200:
                errors += 1
                first_error = first_error or f"{status} {body[:300].decode(errors='replace')}"
            if record:
                latencies[i] = elapsed

    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s) as control:
            # Untimed: every connection serves a request first, so that the timed run starts warm.
            if warmup:
                shared = iter(range(warmup))
                await asyncio.gather(*(worker(k, shared, False) for k in range(concurrency)))
                errors = 0
            stats = [(await control.get(stats_path)).json()] if stats_path else []
            shared = iter(range(len(bodies)))
            started, cpu_started = time.perf_counter(), time.process_time()
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*(worker(k, shared, True) for k in range(concurrency)))
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
            if stats_path:
                stats.append((await control.get(stats_path)).json())
    finally:
        for connection in connections:
            if connection.transport is not None:
                connection.transport.close()
    return seconds, cpu, latencies, errors, first_error, stats


def drive(
    method: str,
    base_url: str,
    path: str,
    bodies: list[dict[str, Any]],
    concurrency: int,
    warmup: int | None = None,
    stats_path: str | None = None,
    timeout_s: float = 600.0,
    headers: dict[str, str] | None = None,
) -> Measurement:
    """POST one body per request with ``concurrency`` in flight, after ``warmup`` untimed
    requests (default: one per connection). With ``stats_path``, the server's stats just
    before and after the timed requests come back in ``extra["server_stats"]``."""
    warm = min(len(bodies), concurrency) if warmup is None else warmup
    seconds, cpu, latencies, errors, first_error, stats = uvloop.run(
        _drive(base_url, path, bodies, concurrency, warm, stats_path, timeout_s, headers)
    )
    # Where the client shares the server's cores, its CPU is part of the picture.
    extra: dict[str, Any] = {"concurrency": concurrency, "client_cpu_ms_per_text": ms_per(cpu, len(bodies))}
    if first_error:
        extra["first_error"] = first_error
    if stats:
        extra["server_stats"] = stats
    return Measurement(method, len(bodies), seconds, latencies, errors, extra)


class LoadClient:
    """Runs ``drive`` in this process, or in one worker process pinned to ``cpus`` (Linux)
    so that generating the load does not take the cores the server is measured on."""

    def __init__(self, cpus: set[int] | None = None) -> None:
        self.cpus = cpus
        self._pool: ProcessPoolExecutor | None = None
        if cpus:
            self._pool = ProcessPoolExecutor(
                1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=os.sched_setaffinity,
                initargs=(0, cpus),
            )

    def drive(
        self,
        method: str,
        base_url: str,
        path: str,
        bodies: list[dict[str, Any]],
        concurrency: int,
        warmup: int | None = None,
        stats_path: str | None = None,
    ) -> Measurement:
        args = (method, base_url, path, bodies, concurrency, warmup, stats_path)
        if self._pool is None:
            return drive(*args)
        return self._pool.submit(drive, *args).result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


@dataclass
class Storm:
    """What a burst of requests got back: the count of each status, the 429 and 503 answers
    that lacked Retry-After, and the connections the server dropped."""

    statuses: dict[int, int]
    without_retry_after: int
    connection_errors: int
    seconds: float
    latencies_s: list[float] = field(default_factory=list, repr=False)

    def percentile_ms(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))] * 1000


async def _storm(
    base_url: str, path: str, body: dict[str, Any], requests: int, concurrency: int, headers: dict[str, str] | None
) -> Storm:
    url = httpx.URL(base_url)
    host, port = url.host, url.port or 80
    raw = _raw_post(f"{host}:{port}", path, body, headers)
    loop = asyncio.get_running_loop()
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    missing = dropped = 0
    left = iter(range(requests))

    async def worker() -> None:
        nonlocal missing, dropped
        connection: _Connection | None = None
        for _ in left:
            try:
                if connection is None:
                    connection = (await loop.create_connection(_Connection, host, port))[1]
                started = time.perf_counter()
                async with asyncio.timeout(120):  # an answer that never comes counts as a dropped connection
                    status, answer_headers, _ = await connection.request(raw)
            except OSError:  # ConnectionError and TimeoutError included: refused, reset, closed, silent
                dropped += 1
                connection = None
                continue
            latencies.append(time.perf_counter() - started)
            statuses[status] = statuses.get(status, 0) + 1
            if status in (429, 503) and "retry-after" not in answer_headers:
                missing += 1
            if answer_headers.get("connection", "").lower() == "close":
                connection.transport.close()
                connection = None
        if connection is not None:
            connection.transport.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Storm(statuses, missing, dropped, time.perf_counter() - started, latencies)


def storm(
    base_url: str,
    path: str,
    body: dict[str, Any],
    *,
    requests: int,
    concurrency: int,
    headers: dict[str, str] | None = None,
) -> Storm:
    """``requests`` POSTs of one body, ``concurrency`` at a time over keep-alive connections,
    counting every answer by status (a connection the server drops is counted and replaced)."""
    return uvloop.run(_storm(base_url, path, body, requests, concurrency, headers))
