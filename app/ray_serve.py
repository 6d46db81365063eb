"""Tessera on Ray Serve: replicas of the unchanged app behind Serve's proxy, cluster-correct.

Install with ``pip install 'tessera[ray]'``. Deploy with a Serve config file
(deploy/ray/serve.yaml: ``serve run`` / ``serve deploy``, or a KubeRay RayService), or with
``python -m app ray`` for a quick start. ``build(args)`` is the application builder both use.

Each replica is one Tessera process (``create_app``, its own models, batchers and lanes),
and Serve's proxy is the HTTP front: it routes, cancels a request whose client left, and
echoes the request id (so the app does not add a second one). What one replica alone
would get wrong for the cluster goes through a ``Coordinator`` deployment (app/cluster.py):
a model loaded or unloaded through the API is applied by every replica, and /metrics
answers every replica's samples, labelled. Replicas declare their CPUs (and GPUs); torch
runs as many threads as the replica has CPUs. A replica takes traffic once its preload
models are loaded; Serve's health check asks the same as /health/ready; on downscale or a
rolling update Serve stops routing to a replica, lets its requests finish
(``graceful_shutdown_timeout_s``: TESSERA_DRAIN_TIMEOUT_S) and the app unloads its models.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from app.api.health import preload_status
from app.cluster import Coordinator, ReplicaAgent

DEFAULTS: dict[str, Any] = {
    "num_replicas": 1,  # or "auto", with autoscaling
    "num_cpus": 2,  # per replica: torch's threads follow it
    "num_gpus": 0,
    "autoscaling": None,  # e.g. {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 32}
    "max_replicas_per_node": None,  # 1 spreads replicas over nodes
    "max_ongoing_requests": 256,  # per replica; the app's own queue pushes back with 429 first
    "env": {},  # TESSERA_* settings for every replica (the catalog, keys, limits ...)
}


@serve.deployment(name="TesseraCoordinator", num_replicas=1, ray_actor_options={"num_cpus": 0})
class CoordinatorDeployment(Coordinator):
    """The coordinator as a Serve deployment: its lifetime is the application's."""


@serve.deployment(name="Tessera")
@serve.ingress()
class TesseraReplica:
    def __init__(self, coordinator: DeploymentHandle, env: dict[str, str]) -> None:
        os.environ.update({k: str(v) for k, v in env.items()})
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
    return TesseraReplica.options(**deployment_options).bind(coordinator, env)  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> None:
    """``python -m app ray``: join (or start) a Ray cluster and serve Tessera on it."""
    parser = argparse.ArgumentParser(prog="python -m app ray", description=main.__doc__)
    parser.add_argument("--address", default=None, help="Ray cluster address (default: auto, or a local one)")
    parser.add_argument("--replicas", type=int, default=DEFAULTS["num_replicas"])
    parser.add_argument("--num-cpus", type=float, default=DEFAULTS["num_cpus"], help="CPUs per replica")
    parser.add_argument("--num-gpus", type=float, default=DEFAULTS["num_gpus"], help="GPUs per replica")
    parser.add_argument("--max-replicas", type=int, help="autoscale between --replicas and this")
    parser.add_argument("--target-ongoing-requests", type=float, default=32)
    parser.add_argument("--host", default=os.environ.get("TESSERA_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("TESSERA_PORT", "8000")))
    args = parser.parse_args(argv)
    ray.init(address=args.address, include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    options: dict[str, Any] = {
        "num_cpus": args.num_cpus,
        "num_gpus": args.num_gpus,
        "num_replicas": args.replicas,
        "env": {k: v for k, v in os.environ.items() if k.startswith("TESSERA_") or k.startswith("HF_")},
    }
    if args.max_replicas:
        options["autoscaling"] = {
            "min_replicas": args.replicas,
            "max_replicas": args.max_replicas,
            "target_ongoing_requests": args.target_ongoing_requests,
        }
    serve.run(build(options), name="tessera", route_prefix="/", blocking=True)
