"""Storms of mixed-shape ``/classify`` requests against ``python -m app serve``, and the RSS of
every server process after each storm: does memory settle on a plateau once the first storm
has warmed things up?

Each request carries 1-8 texts of 5-300 words (drawn afresh for every storm, so the batch
shapes the server forms keep changing); ``--concurrency`` requests are in flight over
keep-alive connections (bench/load.py's lean client), with a small queue
(``TESSERA_MAX_QUEUE_ITEMS``) so that the server also answers 429. After each storm (and a
short pause for the queue to empty) it prints one row per process: the engine and each
front in the default layout, or the one process with ``TESSERA_WORKERS=0``.

    .venv/bin/python bench/mixed_soak.py                       # shipped catalog (MiniLM)
    .venv/bin/python bench/mixed_soak.py --env TESSERA_WORKERS=0
    .venv/bin/python bench/mixed_soak.py --env MALLOC_ARENA_MAX=2 --storms 3

Bounded: ``--storms`` storms of ``--requests`` requests each, on loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import _Connection, _raw_post

ROOT = Path(__file__).resolve().parents[1]

_VOCABULARY = (
    "the a of and to in is was it for on with as at by this that from be are or an not have has "
    "movie film service food staff price quality great terrible good bad awful lovely slow quick "
    "delivery package arrived broken perfect happy angry customer support phone battery screen "
    "camera weather river bank bridge city night morning music concert ticket hotel room clean "
    "dirty noisy quiet friendly rude expensive cheap recommend never again always wonderful boring "
    "interesting story actor plot ending beginning chapter author book library school teacher"
)
WORDS = _VOCABULARY.split()


@dataclass
class StormResult:
    statuses: dict[int, int]
    texts_ok: int
    seconds: float
    dropped: int


def bodies(rng: random.Random, count: int, model: str | None, max_inputs: int, words: tuple[int, int]) -> list[Any]:
    """``count`` request bodies of 1..max_inputs texts of ``words`` words each (raw bytes later)."""
    out = []
    for _ in range(count):
        texts = [" ".join(rng.choices(WORDS, k=rng.randint(*words))) for _ in range(rng.randint(1, max_inputs))]
        body: dict[str, Any] = {"inputs": texts}
        if model:
            body["model"] = model
        out.append(body)
    return out


def mixed_storm(port: int, payloads: list[dict[str, Any]], concurrency: int) -> StormResult:
    """POST each body to ``/classify`` on loopback ``port``, ``concurrency`` at a time."""
    return uvloop.run(_storm(port, payloads, concurrency))


async def _storm(port: int, payloads: list[dict[str, Any]], concurrency: int) -> StormResult:
    host = "127.0.0.1"
    raws = [(_raw_post(f"{host}:{port}", "/classify", b), len(b["inputs"])) for b in payloads]
    loop = asyncio.get_running_loop()
    statuses: dict[int, int] = {}
    texts_ok = dropped = 0
    left = iter(raws)

    async def worker() -> None:
        nonlocal texts_ok, dropped
        connection: _Connection | None = None
        for raw, n in left:
            try:
                if connection is None:
                    connection = (await loop.create_connection(_Connection, host, port))[1]
                async with asyncio.timeout(120):
                    status, headers, _ = await connection.request(raw)
            except OSError:
                dropped += 1
                connection = None
                continue
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                texts_ok += n
            if headers.get("connection", "").lower() == "close":
                connection.transport.close()
                connection = None
        if connection is not None:
            connection.transport.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return StormResult(statuses, texts_ok, time.perf_counter() - started, dropped)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used (page faults are system time)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_processes(root: int) -> dict[str, int]:
    """Role -> pid: the engine and fronts under the supervisor, or the one process ("serve")."""
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != root:
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        args = [a.decode() for a in argv if a]
        if "engine" in args:
            found["engine"] = int(entry.name)
        elif "front" in args:
            index = args[args.index("--index") + 1] if "--index" in args else "?"
            found[f"front-{index}"] = int(entry.name)
    return found or {"serve": root}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_ready(base: str, model: str | None, deadline_s: float = 180) -> None:
    deadline = time.monotonic() + deadline_s
    body: dict[str, Any] = {"inputs": ["warm up"]}
    if model:
        body["model"] = model
    while time.monotonic() < deadline:
        try:
            if httpx.post(f"{base}/classify", json=body, timeout=60).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not answer /classify in time")


def queue_empty(base: str, model: str | None, timeout_s: float = 60) -> None:
    if not model:
        time.sleep(1.0)
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.get(f"{base}/models/{model}", timeout=10).json().get("queue_depth") == 0:
            return
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", type=Path, help="catalog (default: the shipped app/catalog.yaml)")
    parser.add_argument("--model", help="the model to ask for (default: the catalog's classify default)")
    parser.add_argument("--storms", type=int, default=5)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--queue", type=int, default=64, help="TESSERA_MAX_QUEUE_ITEMS")
    parser.add_argument("--max-inputs", type=int, default=8)
    parser.add_argument("--words", type=int, nargs=2, default=(5, 300), metavar=("MIN", "MAX"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server (repeatable)")
    parser.add_argument(
        "--settle", type=float, default=2.0, help="seconds after a storm (queue empty) before RSS is read"
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    port = free_port()
    # A queue this small takes requests of at most as many inputs (the server refuses to start otherwise).
    limits = {"TESSERA_MAX_QUEUE_ITEMS": str(args.queue), "TESSERA_MAX_INPUTS_PER_REQUEST": str(args.queue)}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **limits}
    if args.catalog:
        env["TESSERA_CATALOG"] = str(args.catalog)
    for item in args.env:
        name, _, value = item.partition("=")
        env[name] = value
    base = f"http://127.0.0.1:{port}"
    rows: list[dict[str, Any]] = []
    with tempfile.NamedTemporaryFile(prefix="mixed-soak-", suffix=".log", delete=False) as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "app", "serve", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_ready(base, args.model)
        time.sleep(0.5)
        procs = server_processes(server.pid)
        print(f"server log: {log.name}; env: {' '.join(args.env) or '-'}", flush=True)
        head = f"{'storm':>5} {'process':>8} {'pid':>7} {'rss_mb':>7} {'req/s':>7} {'texts/s':>7} {'cpu_ms/t':>8}"
        print(f"{head}  statuses", flush=True)
        for role, pid in procs.items():
            print(f"{0:>5} {role:>8} {pid:>7} {rss_mb(pid):7.0f}", flush=True)
            rows.append({"storm": 0, "process": role, "rss_mb": round(rss_mb(pid), 1)})
        for n in range(1, args.storms + 1):
            payloads = bodies(
                random.Random(args.seed * 1000 + n), args.requests, args.model, args.max_inputs, args.words
            )
            cpu_before = {role: cpu_s(pid) for role, pid in procs.items()}
            result = mixed_storm(port, payloads, args.concurrency)
            cpu = {role: cpu_s(pid) - cpu_before[role] for role, pid in procs.items()}
            queue_empty(base, args.model)
            time.sleep(args.settle)
            rps = sum(result.statuses.values()) / result.seconds
            tps = result.texts_ok / result.seconds
            for role, pid in procs.items():
                rss = rss_mb(pid)
                cpu_ms = 1000 * cpu[role] / max(result.texts_ok, 1)
                rows.append(
                    {
                        "storm": n,
                        "process": role,
                        "rss_mb": round(rss, 1),
                        "req_per_s": round(rps, 1),
                        "texts_ok_per_s": round(tps, 1),
                        "cpu_ms_per_text_ok": round(cpu_ms, 2),
                        "statuses": result.statuses,
                        "dropped": result.dropped,
                    }
                )
                print(
                    f"{n:>5} {role:>8} {pid:>7} {rss:7.0f} {rps:7.1f} {tps:7.1f} {cpu_ms:8.2f}  "
                    f"{dict(sorted(result.statuses.items()))} dropped={result.dropped}",
                    flush=True,
                )
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    for role in {r["process"] for r in rows}:
        after = [r["rss_mb"] for r in rows if r["process"] == role and r["storm"] >= 2]
        if len(after) >= 2:
            print(f"{role}: storms 2..{args.storms} growth {100 * (after[-1] / after[0] - 1):+.1f} %")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
