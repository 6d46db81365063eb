"""Command line: ``python -m app serve`` runs the server; ``python -m app download`` fills the cache;
``python -m app ray`` serves on a Ray cluster (app/ray_serve.py)."""

from __future__ import annotations

import argparse
import os
import sys

from app.catalog import CatalogError
from app.config import Settings
from app.errors import ModelUnavailable
from app.logs import configure_logging
from app.registry.inferred import catalog_of


def serve(args: argparse.Namespace) -> int:
    if args.model:  # the processes this one starts read them from the environment too
        os.environ["TESSERA_MODELS"] = ",".join(args.model)
    if args.task:
        os.environ["TESSERA_TASK"] = args.task
    overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    settings = Settings(**overrides)
    configure_logging(settings.log_format, settings.log_level)
    try:
        catalog = catalog_of(settings)  # a bad catalog, or a model it cannot serve, stops here
    except CatalogError as exc:
        print(exc, file=sys.stderr)
        return 2
    if settings.models:
        print(f"serving {', '.join(f'{m.name} ({m.task})' for m in catalog.models)}", file=sys.stderr)
    if settings.front_processes:  # fronts and an engine (app/engine/processes.py)
        from app.engine.processes import supervise

        return supervise(settings)
    from app import serving

    try:
        app = serving.build(settings)
    except CatalogError as exc:
        print(exc, file=sys.stderr)
        return 2
    # One process: the event loop, the batchers and the models together.
    serving.run(app, settings)
    return 0


def child(args: argparse.Namespace) -> int:
    """A process the supervisor starts (app/engine/processes.py): the engine or a front."""
    from app.engine.processes import run_engine

    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)
    if args.command == "engine":
        run_engine(settings, args.address)
    else:
        from app.serving import run_front

        run_front(settings, args.address, args.index)
    return 0


def download(args: argparse.Namespace) -> int:
    """Fetch catalog hub models into the HF cache (for baking images and air-gapped hosts)."""
    from app.registry.sources import hf_offline_flag, locate

    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)
    try:
        catalog = catalog_of(settings)
    except CatalogError as exc:
        print(exc, file=sys.stderr)
        return 2
    hub_entries = [m for m in catalog.models if m.source.hub]
    names = args.names or [m.name for m in hub_entries]
    unknown = [n for n in names if catalog.entry(n) is None]
    if unknown:
        print(
            f"unknown model(s): {', '.join(unknown)}; the catalog has: {', '.join(m.name for m in catalog.models)}",
            file=sys.stderr,
        )
        return 2
    if hf_offline_flag():
        print("HF_HUB_OFFLINE=1 is set: downloading needs the hub; unset it and retry", file=sys.stderr)
        return 1
    failed = 0
    for name in names:
        entry = catalog.entry(name)
        assert entry is not None  # unknown names were refused above
        if not entry.source.hub:
            print(f"{name}: {entry.source.describe()} is local, nothing to download")
            continue
        print(f"{name}: downloading {entry.source.describe()} into {os.environ.get('HF_HOME', '~/.cache/huggingface')}")
        try:
            path = locate(entry, online=True, timeout=settings.download_timeout_s)
        except ModelUnavailable as exc:
            print(f"{name}: FAILED: {exc.message}", file=sys.stderr)
            failed += 1
            continue
        print(f"{name}: ready at {path}")
    return 1 if failed else 0


def ray(args: argparse.Namespace) -> int:
    try:
        from app import ray_serve
    except ImportError:
        print("Ray Serve is not installed: pip install 'tessera[ray]'", file=sys.stderr)
        return 2
    ray_serve.main(args.ray_args)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app", description="Tessera inference server")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="run the HTTP server (settings: TESSERA_* environment)")
    run.add_argument("--host", default=None)
    run.add_argument("--port", type=int, default=None)
    run.add_argument(
        "--model",
        action="append",
        metavar="NAME_OR_PATH",
        help="serve this hub id or local model directory instead of the catalog (repeatable)",
    )
    run.add_argument("--task", help="the models' task, where their config cannot tell (e.g. text-classification)")
    run.set_defaults(func=serve)
    fetch = commands.add_parser("download", help="download catalog hub models into the HF cache")
    fetch.add_argument("names", nargs="*", help="catalog names (default: every hub model)")
    fetch.set_defaults(func=download)
    on_ray = commands.add_parser("ray", help="serve on a Ray cluster (python -m app ray --help)", add_help=False)
    on_ray.add_argument("ray_args", nargs=argparse.REMAINDER)
    on_ray.set_defaults(func=ray)
    # The supervisor's children (app/engine/processes.py), not for people to run.
    for name in ("engine", "front"):
        started = commands.add_parser(name)
        started.add_argument("--address", required=True)
        started.add_argument("--index", type=int, default=0)
        started.set_defaults(func=child)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
