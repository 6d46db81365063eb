"""Tessera on Ray Serve: replicas of the unchanged app behind Serve's proxy, cluster-correct.

Install with ``pip install 'tessera[ray]'``. Deploy with a Serve config file
(deploy/ray/serve.yaml: ``serve run`` / ``serve deploy``, or a KubeRay RayService), or with
``python -m app ray`` for a quick start. ``build(args)`` is the application builder both use.

Each replica is one Tessera process (``create_app``, its own models, batchers and lanes).
In front of them, behind Serve's proxy, a ``TesseraGateway`` deployment (CPU-light, no
models) reads each request whole and hands it to a replica through a Serve handle (Serve
picks the replica with the shortest queue); when that replica dies under the request (a
crash, a lost node), the gateway sends the same request to another one, so the client sees
an answer, not an error (app/relay.py). A streamed request (``"stream": true``) goes through
a streaming handle instead and the gateway relays its events as they come; it is sent
again only while none has come: a replica lost once its stream began ends that stream with
an ``error`` event (a client that read half an answer cannot be given the whole one
again). ``gateway_replicas: 0`` drops the gateway: Serve's
proxy then calls the replicas' app directly, one hop less per request, and a replica's death
fails the requests it held. Serve cancels a request whose client left and echoes the
request id (so the app does not add a second one). What one replica alone
would get wrong for the cluster goes through a ``Coordinator`` deployment (app/cluster.py):
a model loaded or unloaded through the API is applied by every replica, and /metrics
answers every replica's samples, labelled. Replicas declare their CPUs (and GPUs); torch
runs as many threads as the replica has CPUs. A replica takes traffic once its preload
models are loaded; Serve's health check asks the same as /health/ready; on downscale or a
rolling update Serve stops routing to a replica, lets its requests finish
(``graceful_shutdown_timeout_s``: TESSERA_DRAIN_TIMEOUT_S) and the app unloads its models.
Traced (app/tracing.py), the gateway makes a request's server span and one span per
replica it tries, whose context reaches the replica's app as the relayed request's
``traceparent``: the replica's spans go below it.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import ray
from opentelemetry.trace import Span, SpanKind
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from app import tracing
from app.api.health import preload_status
from app.api.streaming import frame
from app.cluster import Coordinator, ReplicaAgent
from app.relay import HTTPAnswer, HTTPCall, HTTPHead, answer, answer_stream, naming, read_capped, streams, under

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "num_replicas": 1,  # or "auto", with autoscaling
    "num_cpus": 2,  # per replica: torch's threads follow it
    "num_gpus": 0,
    "autoscaling": None,  # e.g. {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 32}
    "max_replicas_per_node": None,  # 1 spreads replicas over nodes
    "max_ongoing_requests": 256,  # per replica; the app's own queue pushes back with 429 first
    "env": {},  # TESSERA_* settings for every replica (the catalog, keys, limits ...)
    "gateway_replicas": 1,  # 0: no gateway (one hop less; a replica's death fails its requests)
    "attempts": 3,  # replicas a request is tried on when the one holding it dies
}


@serve.deployment(name="TesseraCoordinator", num_replicas=1, ray_actor_options={"num_cpus": 0})
class CoordinatorDeployment(Coordinator):
    """The coordinator as a Serve deployment: its lifetime is the application's."""


@serve.deployment(name="TesseraGateway", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096)
class TesseraGateway:
    """The HTTP ingress in front of the replicas: each request read whole (capped at the
    body limit), answered by a replica, and sent again to another one if its replica dies."""

    def __init__(self, replicas: DeploymentHandle, env: dict[str, str], attempts: int) -> None:
        from app.config import Settings

        os.environ.update(env)
        settings = Settings()
        self.replicas, self.max_body_bytes, self.attempts = replicas, settings.max_body_bytes, attempts
        tracing.configure(settings, "gateway")  # for the actor's life

    async def __call__(self, request: Request) -> Response:
        client = (request.client.host, request.client.port) if request.client else None
        call = HTTPCall(
            request.method,
            request.url.path,
            request.scope.get("query_string", b""),
            list(request.headers.raw),
            await read_capped(request.stream(), self.max_body_bytes),
            client,
        )
        span = tracing.start_server(call.method, call.path, call.headers) if tracing.enabled else None
        if streams(call):
            return await self._streamed(call, request, span)
        try:
            response = await self._answered(call, request, span)
        except BaseException as exc:
            if span is not None:
                tracing.failed(span, type(exc).__name__)
            raise
        finally:
            if span is not None:
                span.end()
        return response

    async def _answered(self, call: HTTPCall, request: Request, span: Span | None) -> Response:
        for attempt in range(1, self.attempts + 1):
            hop = self._hop(span, attempt)
            try:
                got: HTTPAnswer = await self.replicas.forward.remote(under(call, hop or span))
            except RayActorError as exc:  # the replica died holding it; Serve routes around the dead one
                self._lost(call, attempt, exc)
                _ended(hop, exc)
                continue
            _ended(hop, None)
            response = Response(got.body, got.status)
            response.raw_headers = naming(got.headers, span)
            if attempt > 1:  # the client's answer needed a replay: say so (logs, tests)
                response.raw_headers.append((b"x-tessera-attempts", str(attempt).encode()))
            _answered(span, got.status)
            return response
        return self._failed(request)

    @staticmethod
    def _hop(span: Span | None, attempt: int) -> Span | None:
        """The span of one try on a replica, below the gateway's (traced and sampled only)."""
        if span is None or not span.is_recording():
            return None
        context = span.get_span_context()
        return tracing.start("tessera.replica", context, kind=SpanKind.CLIENT, attributes={"tessera.attempt": attempt})

    async def _streamed(self, call: HTTPCall, request: Request, span: Span | None) -> Response:
        """A streamed answer, relayed as it comes; sent to another replica while its head has not come."""
        try:
            response = await self._stream_head(call, request, span)
        except BaseException:
            if span is not None:
                span.end()
            raise
        if span is not None and not isinstance(response, StreamingResponse):
            span.end()
        return response

    async def _stream_head(self, call: HTTPCall, request: Request, span: Span | None) -> Response:
        streaming = self.replicas.options(stream=True)
        for attempt in range(1, self.attempts + 1):
            hop = self._hop(span, attempt)
            relayed = streaming.stream_forward.remote(under(call, hop or span))
            assert isinstance(relayed, DeploymentResponseGenerator)  # what a streaming handle gives
            try:
                head = await relayed.__anext__()
            except RayActorError as exc:
                self._lost(call, attempt, exc)
                _ended(hop, exc)
                continue
            except BaseException as exc:  # the client left before the first event: so does the replica's work
                relayed.cancel()
                _ended(hop, exc)
                raise
            assert isinstance(head, HTTPHead)
            _answered(span, head.status)
            response = StreamingResponse(self._relay(relayed, call, request, (hop, span)), head.status)
            response.raw_headers = naming(head.headers, span)
            if attempt > 1:
                response.raw_headers.append((b"x-tessera-attempts", str(attempt).encode()))
            return response
        return self._failed(request)

    async def _relay(
        self,
        relayed: DeploymentResponseGenerator[Any],
        call: HTTPCall,
        request: Request,
        spans: tuple[Span | None, Span | None] = (None, None),
    ) -> AsyncIterator[bytes]:
        """The stream's events as they come; its spans (the try's, the gateway's) end with it."""
        finished = False
        try:
            async for chunk in relayed:
                assert isinstance(chunk, bytes)
                yield chunk
            finished = True
        except RayActorError as exc:  # begun: it cannot be replayed, so it ends with what happened
            log.warning("replica lost during %s %s, its stream begun: %s", call.method, call.path, exc)
            message = "the replica answering this stream was lost; send the request again"
            body = {"error": "replica_lost", "message": message, "request_id": request.headers.get("x-request-id")}
            yield frame("error", body)
            finished = True
        finally:
            if not finished:  # the client left: so does the replica's work
                relayed.cancel()
            for span in spans:
                if span is not None:
                    span.end()

    def _lost(self, call: HTTPCall, attempt: int, exc: Exception) -> None:
        log.warning(
            "replica lost during %s %s (attempt %d/%d): %s", call.method, call.path, attempt, self.attempts, exc
        )

    def _failed(self, request: Request) -> Response:
        message = f"{self.attempts} replicas were lost while answering this request; retry it"
        body = {"error": "replica_lost", "message": message, "request_id": request.headers.get("x-request-id")}
        return JSONResponse(body, 503, headers={"Retry-After": "1"})


def _answered(span: Span | None, status: int) -> None:
    if span is not None and span.is_recording():
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            tracing.failed(span, f"HTTP {status}")


def _ended(hop: Span | None, error: BaseException | None) -> None:
    if hop is not None:
        if error is not None:
            tracing.failed(hop, type(error).__name__)
        hop.end()


@serve.deployment(name="Tessera")
@serve.ingress()
class TesseraReplica:
    def __init__(self, coordinator: DeploymentHandle, env: dict[str, str]) -> None:
        os.environ.update(env)
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
        # Ray sets OMP_NUM_THREADS to the replica's CPUs; torch's thread budget follows it.
        os.environ.setdefault("TESSERA_TORCH_THREADS", str(max(1, int(cpus))))
        self.coordinator = coordinator
        self.replica = serve.get_replica_context().replica_id.unique_id

    def __serve_build_asgi_app__(self) -> Any:
        from app.config import Settings
        from app.serving import build

        async def call(method: str, *args: Any) -> Any:
            return await getattr(self.coordinator, method).remote(*args)

        self.tessera = build(Settings(), cluster=ReplicaAgent(call, self.replica))
        return self.tessera

    async def forward(self, call: HTTPCall) -> HTTPAnswer:
        """A request the gateway read, answered by this replica's app."""
        return await answer(self.tessera, call)

    async def stream_forward(self, call: HTTPCall) -> AsyncIterator[HTTPHead | bytes]:
        """A streamed request the gateway read, answered by this replica's app as it comes:
        its head, then its events."""
        async for item in answer_stream(self.tessera, call):
            yield item

    def check_health(self) -> None:
        """Serve's health check: unhealthy while draining or when a preload model failed (Serve
        then replaces this replica). A model still loading is not a failure."""
        if self.tessera.state.drain.draining:
            raise RuntimeError("draining")
        _, failed = preload_status(self.tessera.state.registry)  # set before the replica is ready
        if failed:
            raise RuntimeError(f"preload models failed: {', '.join(failed)}")


def build(args: dict[str, Any] | None = None) -> Any:
    """The Serve application (``import_path: app.ray_serve:build``); ``args`` as in DEFAULTS."""
    options = {**DEFAULTS, **(args or {})}
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown Tessera deployment args: {', '.join(sorted(unknown))}")
    env = {k: str(v) for k, v in options["env"].items()}
    if int(options["attempts"]) < 1:
        raise ValueError("attempts must be at least 1 (the first try counts)")
    actor: dict[str, Any] = {"num_cpus": options["num_cpus"], "num_gpus": options["num_gpus"]}
    deployment_options: dict[str, Any] = {
        "ray_actor_options": actor,
        "max_ongoing_requests": options["max_ongoing_requests"],
        "graceful_shutdown_timeout_s": float(env.get("TESSERA_DRAIN_TIMEOUT_S", 25)),
        "health_check_period_s": 5,
    }
    if options["autoscaling"]:
        deployment_options["autoscaling_config"] = options["autoscaling"]
    else:
        deployment_options["num_replicas"] = options["num_replicas"]
    if options["max_replicas_per_node"]:
        deployment_options["max_replicas_per_node"] = options["max_replicas_per_node"]
    coordinator = CoordinatorDeployment.bind()  # type: ignore[attr-defined]  # made by serve.deployment
    replicas = TesseraReplica.options(**deployment_options).bind(coordinator, env)  # type: ignore[attr-defined]
    if not options["gateway_replicas"]:
        return replicas
    gateway = TesseraGateway.options(num_replicas=options["gateway_replicas"])  # type: ignore[attr-defined]
    return gateway.bind(replicas, env, int(options["attempts"]))


def main(argv: list[str] | None = None) -> None:
    """``python -m app ray``: join (or start) a Ray cluster and serve Tessera on it."""
    parser = argparse.ArgumentParser(prog="python -m app ray", description=main.__doc__)
    parser.add_argument("--address", default=None, help="Ray cluster address (default: auto, or a local one)")
    parser.add_argument("--replicas", type=int, default=DEFAULTS["num_replicas"])
    parser.add_argument("--num-cpus", type=float, default=DEFAULTS["num_cpus"], help="CPUs per replica")
    parser.add_argument("--num-gpus", type=float, default=DEFAULTS["num_gpus"], help="GPUs per replica")
    parser.add_argument("--max-replicas", type=int, help="autoscale between --replicas and this")
    parser.add_argument("--target-ongoing-requests", type=float, default=32)
    parser.add_argument(
        "--gateway-replicas",
        type=int,
        default=DEFAULTS["gateway_replicas"],
        help="replay gateways in front of the replicas (0: none, one hop less)",
    )
    parser.add_argument("--host", default=os.environ.get("TESSERA_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("TESSERA_PORT", "8000")))
    args = parser.parse_args(argv)
    ray.init(address=args.address, include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    options: dict[str, Any] = {
        "num_cpus": args.num_cpus,
        "num_gpus": args.num_gpus,
        "num_replicas": args.replicas,
        "gateway_replicas": args.gateway_replicas,
        "env": {k: v for k, v in os.environ.items() if k.startswith("TESSERA_") or k.startswith("HF_")},
    }
    if args.max_replicas:
        options["autoscaling"] = {
            "min_replicas": args.replicas,
            "max_replicas": args.max_replicas,
            "target_ongoing_requests": args.target_ongoing_requests,
        }
    serve.run(build(options), name="tessera", route_prefix="/", blocking=True)
