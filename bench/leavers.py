"""Clients that give up: what the server still computes for them after they left.

    .venv/bin/python bench/leavers.py                     # both layouts, translation
    .venv/bin/python bench/leavers.py --baseline 4256b3d  # and another commit, side by side

Serves the benchmark's opus-mt-en-de-sized Marian (random weights) with ``python -m app
serve`` in each layout (one process, and one front with an engine), then sends a storm of
``/translate`` requests (4 inputs each, 48 new tokens) from clients that give up after
``--patience`` seconds, as clients with timeouts do under load. Once every client has
left, it prints the model's queue depth then, how long until the queue is empty, and the
inputs the model computed from then on (``tessera_batch_size_sum``, read from /metrics,
until the queue is empty and a second passes with no batch): a server that drops a gone
client's work empties its queue at once (the requests' cancellations arrive as the
clients' connections close) and computes nothing more but the batch that was running.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from servers import ROOT, ServerProcess
from workloads import build_marian, make_texts, write_catalog

MODEL = "marian"


def computed(metrics: str) -> float:
    """Inputs the model has computed, summed over the processes that report it."""
    pattern = rf'tessera_batch_size_sum\{{[^}}]*model="{MODEL}"[^}}]*\}} ([0-9.e+]+)'
    return sum(float(v) for v in re.findall(pattern, metrics))


async def storm(url: str, texts: list[str], requests: int, concurrency: int, patience: float) -> int:
    """Send ``requests`` requests, ``concurrency`` at a time, each abandoned after ``patience``."""
    left = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=patience) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            nonlocal left
            body = {
                "inputs": [texts[(4 * i + k) % len(texts)] for k in range(4)],
                "model": MODEL,
                "parameters": {"max_new_tokens": 48, "min_length": 48},
            }
            async with gate:
                try:
                    await client.post("/translate", json=body)
                except httpx.TimeoutException:
                    left += 1

        await asyncio.gather(*(one(i) for i in range(requests)))
    return left


def measure(name: str, env: dict[str, str], cwd: Path, catalog: Path, work: Path, args: argparse.Namespace) -> str:
    texts = make_texts(64)
    server_env = {"TESSERA_CATALOG": str(catalog), "TESSERA_HUB": "offline", **env}
    args_ = ["-m", "app", "serve", "--host", "127.0.0.1", "--port", "{port}"]
    with ServerProcess(
        re.sub(r"[^a-z0-9]+", "-", name), args_, server_env, "/health/ready", work, 300, cwd=cwd
    ) as server:
        http = httpx.Client(base_url=server.url, timeout=60)
        http.post("/translate", json={"inputs": "warm up", "model": MODEL})
        before = computed(http.get("/metrics").text)
        gone = asyncio.run(storm(server.url, texts, args.requests, args.concurrency, args.patience))
        depth = http.get(f"/models/{MODEL}").json()["queue_depth"]  # as the last client left
        at_leave = computed(http.get("/metrics").text)
        started = time.monotonic()
        last, quiet_since, empty_at = at_leave, started, None
        while time.monotonic() - started < 120:
            now_depth = http.get(f"/models/{MODEL}").json()["queue_depth"]
            now = computed(http.get("/metrics").text)
            if now != last:
                last, quiet_since = now, time.monotonic()
            if now_depth == 0 and empty_at is None:
                empty_at = time.monotonic() - started
            if empty_at is not None and time.monotonic() - quiet_since >= 1.0:
                break
            time.sleep(0.05)
        empty = f"{empty_at:.2f} s" if empty_at is not None else "not in 120 s"
    return (
        f"| {name} | {gone} of {args.requests} | {depth} | {empty} | {last - at_leave:.0f} | {at_leave - before:.0f} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", action="append", default=[], metavar="REV", help="also serve this commit")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--patience", type=float, default=2.0, help="seconds before a client gives up")
    args = parser.parse_args()
    layouts = {"one process": {"TESSERA_WORKERS": "0"}, "front + engine": {"TESSERA_WORKERS": "1"}}
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tessera-leavers-")))
        catalog = write_catalog(
            work / "catalog.yaml",
            [
                {
                    "name": MODEL,
                    "task": "translation",
                    "source_lang": "en",
                    "target_lang": "de",
                    "source": {"path": str(build_marian(work / "marian"))},
                }
            ],
        )
        trees = {"this checkout": ROOT}
        for rev in args.baseline:
            tree = work / f"rev-{rev}"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True)
            stack.callback(subprocess.run, ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)])
            trees[rev] = tree
        rows = []
        for code, tree in trees.items():
            for layout, env in layouts.items():
                rows.append(measure(f"{code}, {layout}", env, tree, catalog, work, args))
                print(rows[-1], flush=True)
    print(
        "\n| server | clients that gave up | queue depth as the last left | queue empty after | "
        "inputs computed after | inputs computed during the storm |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
