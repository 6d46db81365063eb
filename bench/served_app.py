"""``python -m app serve``, unchanged, plus GET /bench/stats for the benchmark.

The request path is Tessera's own: this script calls ``app.__main__.main(["serve",
...])``. It adds one read-only route, because nothing in the app exposes these over
HTTP yet: each loaded model's batcher counters (batches formed, items run), and the
CPU seconds each kind of server thread has used (the event loop, the batcher workers,
other Python threads, native pools such as torch's and the tokenizers'), read from
/proc on Linux. The benchmark takes their differences around each timed run: the mean
formed batch size and where the server spends its CPU. It also notes torch's thread
count on the thread that runs each model's forward passes (the batcher's worker,
which torch may size differently from the main thread): the registry's
``build_runner`` is wrapped so that each runner's ``infer`` records it, one C call
per batch.

``TESSERA_BENCH_TREE`` serves another checkout's app/ (bench/run.py --baseline: a git
worktree of another commit) instead of this one's. That app may predate this script:
each hook is installed only where the names it wraps exist, and the route reports only
what that app has (no ``models`` where its registry has no batcher counters).
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, os.environ.get("TESSERA_BENCH_TREE") or str(Path(__file__).resolve().parents[1]))

import torch
from fastapi import FastAPI, Request

import app.main as tessera_main
from app.__main__ import main

try:
    import app.registry.registry as tessera_registry
except ImportError:  # an app of another layout (TESSERA_BENCH_TREE): no thread counts
    tessera_registry = None  # type: ignore[assignment]

_create_app = getattr(tessera_main, "create_app", None)
_build_runner = getattr(tessera_registry, "build_runner", None)
worker_torch_threads: dict[str, int] = {}


def build_runner_noting_threads(entry: Any, *args: Any, **kwargs: Any) -> Any:
    runner = _build_runner(entry, *args, **kwargs)  # type: ignore[misc]
    infer = runner.infer

    def infer_noting_threads(*args: Any, **kwargs: Any) -> Any:  # (payloads, encoded)
        worker_torch_threads[entry.name] = torch.get_num_threads()
        return infer(*args, **kwargs)

    runner.infer = infer_noting_threads
    return runner


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) of this process's live threads, by kind; {} off Linux."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    named = {t.native_id: t.name for t in threading.enumerate()}
    main_id = threading.main_thread().native_id
    out = {"event_loop": 0.0, "batcher": 0.0, "python_threads": 0.0, "native_pools": 0.0}
    for task in tasks.iterdir():
        try:
            # Fields after the parenthesised name: state is field 3, utime 14, stime 15.
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        tid = int(task.name)
        if tid == main_id:
            kind = "event_loop"
        elif named.get(tid, "").startswith("batcher-"):
            kind = "batcher"
        elif tid in named:
            kind = "python_threads"
        else:
            kind = "native_pools"
        out[kind] += (int(fields[11]) + int(fields[12])) / tick
    return out


def create_app_with_stats(settings: Any = None, **options: Any) -> FastAPI:
    application = _create_app(settings, **options)  # type: ignore[misc]  # whatever it takes besides settings

    @application.get("/bench/stats", include_in_schema=False)
    async def stats(request: Request) -> dict[str, Any]:
        out: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "worker_torch_threads": worker_torch_threads}
        try:
            out["models"] = {
                slot.entry.name: {"batches": slot.batcher.batches, "items": slot.batcher.items}
                for slot in request.app.state.registry.slots()
                if slot.batcher is not None
            }
        except AttributeError as exc:  # another commit's registry (TESSERA_BENCH_TREE)
            out["models_unavailable"] = repr(exc)
        out["cpu_s"] = thread_cpu_seconds()
        return out

    return application


if __name__ == "__main__":
    # app.serving imports create_app from app.main when `serve` first imports it, so it finds this one.
    if _create_app is not None:
        tessera_main.create_app = create_app_with_stats
    if _build_runner is not None:
        tessera_registry.build_runner = build_runner_noting_threads
    sys.exit(main(["serve", *sys.argv[1:]]))
