"""Prometheus metrics: requests, batches, queues, model loads and memory (served at /metrics
by app/api/metrics.py).

Each process (and each app in tests) owns its CollectorRegistry, so they never collide. A
scraper that asks for OpenMetrics gets it, with the exemplars (a sampled request's trace id,
app/tracing.py) that the Prometheus text format cannot carry.
Request metrics are fed by the request middleware, batch and load metrics by registry
hooks, and queue depth and model memory are read from the models' slots at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.registry import Collector

from app.batching.running import BatchRecord
from app.registry.slots import CatalogSlots, ModelState, RegistryHooks

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

    def observe_request(
        self, route: str, model: str, status: int, seconds: float, exemplar: dict[str, str] | None = None
    ) -> None:
        """One answered request; ``exemplar`` (its trace's ids) shows in the OpenMetrics exposition."""
        self.requests.labels(route, model, str(status)).inc()
        self.latency.labels(route, model, str(status)).observe(seconds, exemplar)

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

    def watch(self, models: CatalogSlots) -> None:
        self.registry.register(_ModelCollector(models))


class _ModelCollector(Collector):
    """Live model state, read when Prometheus scrapes."""

    def __init__(self, models: CatalogSlots) -> None:
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


def exposition(registry: CollectorRegistry, openmetrics: bool = False) -> bytes:
    """``registry``'s samples in the Prometheus text format, or OpenMetrics (with exemplars)."""
    return generate_openmetrics(registry) if openmetrics else generate_latest(registry)


def merge_expositions(texts: dict[str, str], label: str = "replica", openmetrics: bool = False) -> str:
    """Expositions of several replicas (or processes) as one: each family's HELP and TYPE (and
    UNIT) once, then every one's samples of it, each labelled ``<label>="<id>"``; OpenMetrics
    ones end with one ``# EOF``."""
    families: dict[str, list[str]] = {}
    headers: dict[str, list[str]] = {}
    for replica, text in texts.items():
        current = ""
        for line in text.splitlines():
            if line.startswith(("# HELP ", "# TYPE ", "# UNIT ")):
                current = line.split(" ", 3)[2]
                seen = headers.setdefault(current, [])
                families.setdefault(current, [])
                if line not in seen:
                    seen.append(line)
            elif line and not line.startswith("#"):
                families.setdefault(current, []).append(_labelled(line, f'{label}="{replica}"'))
    lines = []
    for name, samples in families.items():
        lines += headers.get(name, [])
        lines += samples
    if openmetrics:
        lines.append("# EOF")
    return "\n".join(lines) + "\n"


def _labelled(sample: str, label: str) -> str:
    name_end = next(i for i, ch in enumerate(sample) if ch in "{ ")
    name, rest = sample[:name_end], sample[name_end:]
    if rest.startswith("{}"):
        return f"{name}{{{label}}}{rest[2:]}"
    if rest.startswith("{"):
        return f"{name}{{{label},{rest[1:]}"
    return f"{name}{{{label}}}{rest}"
