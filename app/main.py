"""The application factory: ``create_app(settings)`` builds the FastAPI app.

The catalog is validated here, before anything serves, so a bad entry stops start-up
with a message naming it. The lifespan opens the engine's client: in one process (and a
Ray replica) it starts the engine core itself (app/engine/core.py: the hub's reachability
decided, preload entries loading in the background: liveness answers at once, readiness
waits for them) and drives it in-process; in a front process it connects to the engine
process over ZeroMQ. Either way the service and the routes see one interface.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app import tracing
from app.api import compat_hf, compat_openai, docs, health, metrics, models, native, rerank
from app.api.compat_hf import hf_tasks
from app.api.drain import Drain
from app.api.errors import install_error_handlers
from app.api.middleware import RequestContextMiddleware
from app.api.openapi import build_openapi
from app.api.security import BodySizeLimit, Keys, require_api_key
from app.cluster import ReplicaAgent
from app.config import Settings
from app.engine.client import InprocClient
from app.engine.zmq_client import ZmqClient
from app.metrics import Metrics, exposition
from app.registry.inferred import catalog_of
from app.service.service import InferenceService

log = logging.getLogger(__name__)

ENGINE_WAIT_S = 60.0  # how long a front waits at start-up for the engine's first word


@dataclass(frozen=True)
class Front:
    """A front process's place: the engine's address and its own name (its metrics' ``process``)."""

    address: str
    identity: str


DESCRIPTION = """
Text classification (with zero-shot), translation, summarization and embeddings from
pretrained transformer models, behind one HTTP API with dynamic batching.

Every task route takes `inputs` (a string or a list of strings) and an optional `model`
(a name from `GET /models`; omitted, the endpoint's default answers). Every error answers
`{"error", "message", "request_id"}` with the status documented on each operation.
"""

TAGS = [
    {"name": "tasks", "description": "Classification, translation, summarization and embeddings."},
    {"name": "models", "description": "The catalog with live state; load and unload models."},
    {"name": "health", "description": "Liveness and readiness probes (no API key needed)."},
    {"name": "operations", "description": "Prometheus metrics."},
    {
        "name": "Hugging Face compatibility",
        "description": "The HF Inference API shapes, for InferenceClient.",
    },
    {
        "name": "OpenAI compatibility",
        "description": "OpenAI embeddings and model list, for the openai client.",
    },
]


def create_app(
    settings: Settings | None = None,
    on_models_changed: Callable[[], None] | None = None,
    cluster: ReplicaAgent | None = None,
    engine: Front | None = None,
) -> FastAPI:
    """The app. ``on_models_changed`` is called (off the event loop) after each model load or
    unload: the serve entry point (app/serving.py) uses it to manage the garbage collector,
    which an app embedded in another process leaves alone. ``cluster`` makes it one replica
    of many (app/cluster.py): model management and /metrics hold cluster-wide, preload models
    load before the replica takes traffic, and the router in front echoes the request id.
    ``engine`` makes it a front process (app/engine): the models live in the engine process
    at that address, and /metrics answers for every process."""
    settings = settings or Settings()
    catalog = catalog_of(settings)

    def own_metrics(openmetrics: bool = False) -> bytes:
        """This process's exposition (a front's, a replica's, or the whole server's)."""
        return exposition(app.state.metrics.registry, openmetrics)

    async def local_metrics(openmetrics: bool = False) -> bytes:
        return own_metrics(openmetrics)

    @asynccontextmanager
    async def front_lifespan(app: FastAPI) -> AsyncIterator[None]:
        assert engine is not None
        client = ZmqClient(catalog, engine.address, engine.identity, own_metrics)
        await client.start(ENGINE_WAIT_S)
        app.state.registry = client
        app.state.exposition = client.metrics
        app.state.service = InferenceService(settings, client)
        try:
            yield
        finally:
            await client.close()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        role = engine.identity if engine else ("replica" if cluster else "server")
        traced = tracing.configure(settings, role)
        try:
            async with serving_lifespan(app):
                yield
        finally:
            if traced:
                tracing.release()

    @asynccontextmanager
    async def serving_lifespan(app: FastAPI) -> AsyncIterator[None]:
        if engine is not None:
            async with front_lifespan(app):
                yield
            return
        from app.engine.startup import open_engine  # here: a front process imports no torch

        core = await open_engine(settings, catalog, app.state.metrics, on_models_changed)
        client = InprocClient(core)
        app.state.registry = client
        app.state.service = InferenceService(settings, client)
        app.state.exposition = cluster.metrics if cluster else local_metrics
        core.start(preload=not cluster)
        if cluster:  # a replica takes traffic once loaded, and once it has caught up
            await core.preload()
            await cluster.start(client, own_metrics)
        try:
            yield
        finally:
            if cluster:
                await cluster.stop()
            await core.close()

    app = FastAPI(
        title="Tessera inference server",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=TAGS,
        openapi_url=None,  # served by app.api.docs, behind the API key unless docs_public
        docs_url=None,  # /docs and /redoc come from app.api.docs, without a CDN
        redoc_url=None,
        # Without keys there is nothing to check: no dependency to solve on every request.
        dependencies=[Depends(require_api_key)] if settings.api_keys or settings.admin_keys else [],
        # FastAPI's own OpenTelemetry hooks ask the global providers on every request (5 % of the
        # event loop's time under load, measured), and its handler's steps would take the direct
        # JSON path's place (app/api/json_route.py): Tessera's request middleware makes the server
        # span instead (app/tracing.py).
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.cluster = cluster
    app.state.catalog = catalog
    app.state.hf_tasks = hf_tasks(catalog)
    app.state.keys = Keys(settings)
    app.openapi = lambda: build_openapi(app)  # type: ignore[method-assign]
    install_error_handlers(app)
    app.state.metrics = Metrics()
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    app.add_middleware(BodySizeLimit, max_body_bytes=settings.max_body_bytes)
    # Outermost, so that every answer (413s included) carries a request id and is counted.
    app.state.drain = Drain()
    app.add_middleware(
        RequestContextMiddleware,
        observe=app.state.metrics.observe_request,
        drain=app.state.drain,
        replica=cluster.replica if cluster else None,
    )
    app.include_router(native.router)
    app.include_router(rerank.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(compat_hf.router)
    app.include_router(compat_openai.router)
    app.include_router(docs.router)
    return app
