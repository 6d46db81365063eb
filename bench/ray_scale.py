"""What Ray Serve costs and gives, measured beside plain uvicorn on the same box in one run.

    .venv/bin/python bench/ray_scale.py [--quick] [--out FILE]

One model (all-MiniLM-L6-v2 layout with a random classification head), single-text
``/classify`` requests from the bench's lean client, and these ways to serve it:

- ``uvicorn``: ``python -m app serve``, one process, torch on every core;
- ``serve 1 replica``: the same app as one Serve replica with every core, behind Serve's
  proxy and Tessera's gateway (app/ray_serve.py), and ``direct`` without the gateway;
- ``serve 2 replicas``: two replicas of half the cores each, with and without the gateway.

Each is measured at concurrency 32 (throughput) and 1 (p50 latency), every way once per
round with the order reversed every other round, and the box's CPU time per request is read
from /proc/stat (every process on the box: proxy, gateway, replicas, Ray's own daemons,
the client). On a box with few cores the replicas share them, so two replicas cannot add
throughput here; the figures say what each hop costs, which is what a bigger cluster pays
per request too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from load import LoadClient, Measurement, merge
from servers import ServerProcess, free_port, wait_ready
from workloads import build_minilm_classifier, make_texts, write_catalog

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # app/, for the Serve application

CORES = len(os.sched_getaffinity(0))
SERVE_WAYS: dict[str, dict[str, Any]] = {
    "serve 1 replica": {"num_replicas": 1, "num_cpus": CORES},
    "serve 1 replica, direct": {"num_replicas": 1, "num_cpus": CORES, "gateway_replicas": 0},
    "serve 2 replicas": {"num_replicas": 2, "num_cpus": CORES / 2},
    "serve 2 replicas, direct": {"num_replicas": 2, "num_cpus": CORES / 2, "gateway_replicas": 0},
}


def busy_seconds() -> float:
    """CPU seconds the whole box has spent outside idle since boot."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def measure(
    name: str, url: str, bodies: list[dict[str, Any]], single: int, client: LoadClient
) -> dict[str, Measurement]:
    client.drive("warm", url, "/classify", bodies[:128], 32)
    start = busy_seconds()
    loaded = client.drive(name, url, "/classify", bodies, 32)
    loaded.extra["box_cpu_ms_per_request"] = round(1000 * (busy_seconds() - start) / len(bodies), 2)
    one = client.drive(name, url, "/classify", bodies[:single], 1)
    return {"c=32": loaded, "c=1": one}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer texts, one round")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    texts_n, single, rounds = (256, 48, 1) if args.quick else (1024, 128, 2)

    import ray
    from ray import serve

    from app.ray_serve import build

    work = Path(tempfile.mkdtemp(prefix="tessera-ray-bench-"))
    model_dir = build_minilm_classifier(work / "classifier")
    entry = {"name": "bench-clf", "task": "text-classification", "source": {"path": str(model_dir)}, "preload": True}
    catalog = write_catalog(work / "catalog.yaml", [entry])
    env = {"TESSERA_CATALOG": str(catalog), "TESSERA_HUB": "offline", "HF_HUB_OFFLINE": "1"}
    bodies = [{"inputs": t, "model": "bench-clf"} for t in make_texts(texts_n)]
    client = LoadClient()

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=CORES, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve_url = f"http://127.0.0.1:{port}"
    runs: dict[str, dict[str, list[Measurement]]] = {}
    uvicorn = ServerProcess(
        "uvicorn",
        ["-m", "app", "serve", "--host", "127.0.0.1", "--port", "{port}"],
        {**env, "TESSERA_WORKERS": "0"},  # one process, as each Serve replica is
        "/health/ready",
        work,
        timeout_s=300,
    )
    try:
        with uvicorn:

            def serve_way(options: dict[str, Any]) -> Callable[[str], dict[str, Measurement]]:
                def run(name: str) -> dict[str, Measurement]:
                    serve.run(build({**options, "env": env}), name="tessera", route_prefix="/")
                    try:
                        if not wait_ready(serve_url + "/health/ready", 300):
                            raise RuntimeError(f"Serve's {name} did not become ready in 300 s")
                        return measure(name, serve_url, bodies, single, client)
                    finally:
                        serve.delete("tessera")

                return run

            ways: dict[str, Callable[[str], dict[str, Measurement]]] = {
                "uvicorn": lambda name: measure(name, uvicorn.url, bodies, single, client),
                **{name: serve_way(options) for name, options in SERVE_WAYS.items()},
            }
            for r in range(rounds):
                order = list(ways) if r % 2 == 0 else list(reversed(ways))
                for name in order:
                    print(f"round {r + 1}/{rounds}: {name} ...", flush=True)
                    for load, m in ways[name](name).items():
                        runs.setdefault(name, {}).setdefault(load, []).append(m)
    finally:
        serve.shutdown()
        ray.shutdown()
        client.close()

    merged = {name: {load: merge(ms) for load, ms in loads.items()} for name, loads in runs.items()}
    base = merged["uvicorn"]
    print(f"\n{CORES} cores, single-text /classify, {texts_n} requests at c=32 and {single} at c=1, {rounds} round(s)")
    header = ("way", "req/s c=32", "x uvicorn", "p50 c=1 ms", "+ms", "box CPU ms/req", "errors")
    print(
        f"{header[0]:<26} {header[1]:>10} {header[2]:>9} {header[3]:>10} {header[4]:>6} {header[5]:>14} {header[6]:>6}"
    )
    table = {}
    for name, m in merged.items():
        p50, base_p50 = m["c=1"].percentile_ms(50) or 0.0, base["c=1"].percentile_ms(50) or 0.0
        cpu = [r.extra["box_cpu_ms_per_request"] for r in runs[name]["c=32"]]
        row = {
            "requests_per_s": round(m["c=32"].throughput, 1),
            "vs_uvicorn": round(m["c=32"].throughput / base["c=32"].throughput, 3),
            "p50_ms_c1": round(p50, 2),
            "p50_added_ms": round(p50 - base_p50, 2),
            "box_cpu_ms_per_request": round(sum(cpu) / len(cpu), 2),
            "errors": m["c=32"].errors + m["c=1"].errors,
        }
        table[name] = row
        print(
            f"{name:<26} {row['requests_per_s']:>10} {row['vs_uvicorn']:>9} {row['p50_ms_c1']:>10} "
            f"{row['p50_added_ms']:>6} {row['box_cpu_ms_per_request']:>14} {row['errors']:>6}"
        )
    if args.out:
        args.out.write_text(json.dumps({"cores": CORES, "texts": texts_n, "rounds": rounds, "ways": table}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
