"""Prometheus metrics: requests, batches, queues, model loads and memory, served at /metrics.

Each app owns its CollectorRegistry, so several apps (tests, workers) never collide.
Request metrics are fed by the request middleware, batch and load metrics by registry
hooks, and queue depth and model memory are read from the registry at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from app.api.errors import error_responses
from app.batching.running import BatchRecord
from app.registry.slots import Models, ModelState, RegistryHooks

router = APIRouter(tags=["operations"])

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tessera_requests_total", "HTTP requests.", ["route", "model", "status"], registry=r)
        self.latency = Histogram(
            "tessera_request_seconds",
            "HTTP request latency.",
            ["route", "model", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "tessera_batch_size", "Inputs per formed batch.", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "tessera_batch_padded_tokens",
            "Padded tokens per batch.",
            ["model"],
            buckets=(64, 256, 1024, 4096, 16384, 65536),
            registry=r,
        )
        self.tokens = Counter(
            "tessera_batch_tokens_total",
            "Tokens run in batches: kind=input (the inputs' own) and kind=padded (as a padded batch).",
            ["model", "kind"],
            registry=r,
        )
        self.inference = Histogram(
            "tessera_inference_seconds",
            "Forward pass (or generate) time per batch.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "tessera_queue_wait_seconds",
            "Time the oldest input of a batch waited.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.loads = Counter("tessera_model_loads_total", "Model loads.", ["model", "outcome"], registry=r)
        self.load_seconds = Histogram(
            "tessera_model_load_seconds",
            "Model load time.",
            ["model"],
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )

    def hooks(self) -> RegistryHooks:
        return RegistryHooks(on_batch=self.observe_batch, on_load=self.observe_load)

    def observe_request(self, route: str, model: str, status: int, seconds: float) -> None:
        self.requests.labels(route, model, str(status)).inc()
        self.latency.labels(route, model, str(status)).observe(seconds)

    def observe_batch(self, model: str, record: BatchRecord) -> None:
        self.batch_size.labels(model).observe(record.size)
        self.batch_tokens.labels(model).observe(record.padded_tokens)
        self.tokens.labels(model, "input").inc(record.tokens)
        self.tokens.labels(model, "padded").inc(record.padded_tokens)
        self.inference.labels(model).observe(record.infer_s)
        self.queue_wait.labels(model).observe(record.queue_wait_s)

    def observe_load(self, model: str, seconds: float, ok: bool) -> None:
        self.loads.labels(model, "success" if ok else "failure").inc()
        if ok:
            self.load_seconds.labels(model).observe(seconds)

    def watch(self, models: Models) -> None:
        self.registry.register(_ModelCollector(models))


class _ModelCollector(Collector):
    """Live model state, read when Prometheus scrapes."""

    def __init__(self, models: Models) -> None:
        self.models = models

    def collect(self) -> Iterator[GaugeMetricFamily]:
        loaded = GaugeMetricFamily("tessera_model_loaded", "1 if the model is loaded.", labels=["model", "device"])
        memory = GaugeMetricFamily("tessera_model_memory_bytes", "Weights and buffers in memory.", labels=["model"])
        depth = GaugeMetricFamily("tessera_queue_depth", "Inputs queued for the model.", labels=["model"])
        for slot in self.models.slots():
            name = slot.entry.name
            loaded.add_metric([name, slot.device or ""], 1.0 if slot.state is ModelState.loaded else 0.0)
            memory.add_metric([name], float(slot.memory_bytes))
            depth.add_metric([name], float(slot.queue_depth))
        yield from (loaded, memory, depth)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "content": {
                "text/plain": {
                    "example": 'tessera_requests_total{route="/classify",model="minilm",status="200"} 42.0\n'
                }
            }
        },
        **error_responses(401),
    },
    summary="Prometheus metrics",
)
async def metrics(request: Request) -> Response:
    """Request, batch, queue and model metrics in the Prometheus text format. On a cluster
    (Ray Serve), every live replica's, each sample labelled with its `replica`; with front
    processes (TESSERA_WORKERS), every process's, each sample labelled with its `process`."""
    return Response(await request.app.state.exposition(), media_type=CONTENT_TYPE_LATEST)
