"""The benchmark: Tessera served over HTTP vs the same model offline vs a naive server.

    .venv/bin/python bench/run.py                      # both scenarios, CPU (make bench)
    .venv/bin/python bench/run.py --quick              # fewer texts, one round
    .venv/bin/python bench/run.py --scenario seq2seq   # one scenario (classification, seq2seq, ceiling)
    .venv/bin/python bench/run.py --device cuda        # bert-base fp16 on a GPU: served vs offline
    .venv/bin/python bench/run.py --server-cpus 0,1 --client-cpus 2-5   # load from other cores
    .venv/bin/python bench/run.py --scenario seq2seq --baseline 4c6ba77   # and another commit served

Each scenario builds its model directory, starts the real server (bench/served_app.py:
``python -m app serve`` plus a read-only stats route) and, for classification, the naive
pipeline server (bench/naive_server.py), each as its own uvicorn process. Every method
then runs on the same texts, back to back and never at the same time, for ``--rounds``
rounds with the order reversed every other round; each method is warmed up first.
Results are printed next to the targets (not asserted) and written as JSON.

``--baseline REV`` (repeatable) also serves commit REV, as bench/ceiling.py does: a git
worktree of REV in a temporary folder, its app/ run by this checkout's served_app.py with
that worktree as its cwd and on its path (TESSERA_BENCH_TREE), on the same catalog and
model directory. Nothing of REV is imported here: it is measured over HTTP, by the same
load client on the same texts, in the same interleaved rounds as this checkout's served
server, and printed next to it with the ratios this/baseline. Where REV's app lacks
what the stats route reads, its batch sizes and server CPU are reported as unavailable. The ceiling
scenario (bench/ceiling.py: a near-free model under wrk, the server's own cost per request)
runs where ``wrk`` is installed.

The load client needs CPU too. By default it shares the cores with the server, and its
CPU per text is reported so that its share is visible; with ``--client-cpus`` it runs
in a process pinned to other cores, and ``--server-cpus`` pins the servers and the
in-process loops (restarting this script under that affinity, so that torch sizes its
thread pool for it).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # app/, for the forward the server runs
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import ceiling
import httpx
import torch
import yaml
from load import LoadClient, Measurement, merge, ms_per
from offline import OfflineModel
from servers import BENCH_DIR, ROOT, ServerProcess
from workloads import (
    build_bert_base_classifier,
    build_marian,
    build_minilm_classifier,
    make_texts,
    write_catalog,
)

RESULTS = BENCH_DIR / "results" / "latest.json"
GENERATION = {"max_new_tokens": 32, "min_length": 33}  # decoder start + 32 tokens: no early EOS
PINNED_ENV = "TESSERA_BENCH_PINNED"
STATS = "/bench/stats"  # bench/served_app.py's counters route


@dataclass
class Sizes:
    """How many texts each part runs on; --quick shrinks them."""

    clf_texts: int
    clf_single: int
    s2s_texts: int
    s2s_single: int
    rounds: int


FULL = Sizes(clf_texts=1536, clf_single=256, s2s_texts=96, s2s_single=24, rounds=2)
QUICK = Sizes(clf_texts=384, clf_single=64, s2s_texts=32, s2s_single=8, rounds=1)


# -- servers and their stats -----------------------------------------------------------


@dataclass
class Variant:
    """What a run changes in the served server, to measure one setting against the default:
    entry options (``torchscript: false``) and environment (``TESSERA_LANES_PER_MODEL=1``)."""

    entry: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


VARIANT = Variant()  # set once by main from --served-entry / --served-env


@dataclass
class Baseline:
    """Another commit to serve next to this checkout (--baseline): its git worktree."""

    rev: str
    commit: str
    tree: Path

    @property
    def label(self) -> str:
        return f"baseline {self.rev}"


BASELINES: list[Baseline] = []  # set once by main from --baseline


def served_server(catalog: Path, logs: Path, baseline: Baseline | None = None) -> ServerProcess:
    """This checkout's app, or with ``baseline`` that commit's (its worktree as cwd and on
    served_app.py's path), under served_app.py's stats route."""
    env = {"TESSERA_CATALOG": str(catalog), "TESSERA_HUB": "offline", "HF_HUB_OFFLINE": "1", **VARIANT.env}
    args = [str(BENCH_DIR / "served_app.py"), "--host", "127.0.0.1", "--port", "{port}"]
    if baseline is None:
        return ServerProcess("served", args, env, "/health/ready", logs, timeout_s=300)
    env["TESSERA_BENCH_TREE"] = str(baseline.tree)
    name = "served-baseline-" + re.sub(r"[^\w.-]", "_", baseline.rev)
    return ServerProcess(name, args, env, "/health/ready", logs, timeout_s=300, cwd=baseline.tree)


def has_stats(server: ServerProcess) -> bool:
    """Whether the server answers served_app.py's stats route (not a front of TESSERA_WORKERS)."""
    try:
        answer = httpx.get(server.url + STATS, timeout=10)
        return answer.status_code == 200 and isinstance(answer.json(), dict)
    except (httpx.HTTPError, ValueError):
        return False


def naive_server(model_dir: Path, logs: Path) -> ServerProcess:
    args = [str(BENCH_DIR / "naive_server.py"), "--port", "{port}"]
    return ServerProcess("naive", args, {"BENCH_NAIVE_MODEL": str(model_dir)}, "/health", logs, timeout_s=300)


def _get(server: ServerProcess, path: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(server.url + path, timeout=10).json()
    return body


def served_stats(measurement: Measurement, model: str) -> Measurement:
    """The batches the served server formed during the timed requests, and its CPU per text."""
    stats = measurement.extra.pop("server_stats", None)
    if not stats:  # no stats route (fronts and an engine, TESSERA_WORKERS): unavailable
        return measurement
    before, after = stats
    if model in after.get("models", {}) and model in before.get("models", {}):  # not in some baselines' apps
        counts = [after["models"][model][k] - before["models"][model][k] for k in ("batches", "items")]
        measurement.extra["batches"], measurement.extra["items"] = counts
        measurement.extra["mean_batch_size"] = round(counts[1] / counts[0], 2) if counts[0] else None
    cpu = {k: ms_per(after["cpu_s"][k] - before["cpu_s"][k], measurement.texts) for k in after.get("cpu_s", {})}
    if cpu:
        cpu["total"] = round(sum(cpu.values()), 3)
        measurement.extra["server_cpu_ms_per_text"] = cpu
    return measurement


def naive_stats(measurement: Measurement) -> Measurement:
    """The naive server's process CPU per text during the timed requests."""
    before, after = measurement.extra.pop("server_stats")
    measurement.extra["server_cpu_ms_per_text"] = {"total": ms_per(after["cpu_s"] - before["cpu_s"], measurement.texts)}
    return measurement


def torch_threads(
    offline: OfflineModel,
    served: ServerProcess,
    model: str,
    naive: ServerProcess | None = None,
    baselines: dict[str, ServerProcess] | None = None,
) -> dict[str, int]:
    """torch's thread count where each method runs its forward passes (after warm-up).

    The served figure is what the serving lane last used: with two lanes busy, one each
    (app/batching/threads.py); a lone request gets all of them. A baseline whose app
    served_app.py cannot hook is left out.
    """
    # With fronts and an engine (TESSERA_WORKERS), the route is not there: -1, unknown.
    stats = _get(served, STATS) if has_stats(served) else {}
    threads = {"offline": offline.torch_threads, "served": stats.get("worker_torch_threads", {}).get(model, -1)}
    for label, server in (baselines or {}).items():
        found = (_get(server, STATS) if has_stats(server) else {}).get("worker_torch_threads", {}).get(model)
        if found is not None:
            threads[label] = found
    if naive is not None:
        threads["naive"] = _get(naive, "/health")["worker_torch_threads"]
    print(f"  torch threads on the threads that run the model: {threads}", flush=True)
    if len(set(threads.values())) > 1:
        print("  note: the methods ran torch with different thread counts (served: its last batch's)", flush=True)
    return threads


# -- running and judging ---------------------------------------------------------------


def interleave(rounds: int, methods: dict[str, Callable[[], Measurement]]) -> dict[str, Measurement]:
    """Run every method once per round, the order reversed every other round."""
    runs: dict[str, list[Measurement]] = {name: [] for name in methods}
    for r in range(rounds):
        names = list(methods) if r % 2 == 0 else list(reversed(methods))
        for name in names:
            print(f"  round {r + 1}/{rounds}: {name} ...", flush=True)
            runs[name].append(methods[name]())
    return {name: merge(measurements) for name, measurements in runs.items()}


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def check(label: str, value: float | None, target: float, op: str, unit: str = "x") -> dict[str, Any]:
    met = value is not None and (value >= target if op == ">=" else value <= target)
    return {"target": label, "value": value, "goal": f"{op} {target}{unit}", "met": met}


def served_runner(
    client: LoadClient, server: ServerProcess, label: str, route: str, bodies: list[dict[str, Any]], model: str
) -> Callable[[int, int], Measurement]:
    """A timed run of the first ``n`` bodies at a concurrency against one served server, with
    its stats where it has the route (a baseline's app may not: then they are unavailable)."""
    stats_path = STATS if has_stats(server) else None
    if stats_path is None:
        print(f"  {label}: no {STATS} route; its batches and server CPU are not reported", flush=True)

    def run(n: int, concurrency: int) -> Measurement:
        return served_stats(
            client.drive(label, server.url, route, bodies[:n], concurrency, stats_path=stats_path), model
        )

    return run


def baseline_servers(stack: contextlib.ExitStack, catalog: Path, work: Path) -> dict[str, ServerProcess]:
    """Each --baseline commit served on the same catalog, next to this checkout's server."""
    servers = {}
    for baseline in BASELINES:
        print(f"  starting {baseline.label} ({baseline.commit[:12]}) ...", flush=True)
        servers[baseline.label] = stack.enter_context(served_server(catalog, work, baseline))
    return servers


def compare(results: dict[str, Measurement], concurrencies: list[int]) -> dict[str, Any]:
    """Per concurrency: this checkout's served figures, each baseline's, and this/baseline."""
    out: dict[str, Any] = {}
    for baseline in BASELINES:
        rows = out[baseline.rev] = {"commit": baseline.commit}
        for c in concurrencies:
            this, base = results[f"served c={c}"], results[f"{baseline.label} c={c}"]
            figures: dict[str, Any] = {
                "this": {"texts_per_s": round(this.throughput, 2)},
                "baseline": {"texts_per_s": round(base.throughput, 2)},
            }
            figures["ratio"] = {"texts_per_s": ratio(this.throughput, base.throughput)}
            for q in (50, 99):
                mine, theirs = this.percentile_ms(q), base.percentile_ms(q)
                figures["this"][f"p{q}_ms"] = None if mine is None else round(mine, 2)
                figures["baseline"][f"p{q}_ms"] = None if theirs is None else round(theirs, 2)
                figures["ratio"][f"p{q}_ms"] = None if mine is None or not theirs else ratio(mine, theirs)
            figures["baseline_errors"] = base.errors
            rows[f"c={c}"] = figures
    return out


def latency_check(served: Measurement, single: Measurement) -> dict[str, Any]:
    served_p50, single_p50 = served.percentile_ms(50), single.percentile_ms(50)
    gap = None if served_p50 is None or single_p50 is None else round(served_p50 - single_p50, 2)
    return check("c=1: served p50 - offline single-item p50", gap, 3.0, "<=", " ms")


def report(
    name: str,
    model: str,
    threads: dict[str, int],
    results: dict[str, Measurement],
    ratios: dict[str, float | None],
    targets: list[dict[str, Any]],
) -> dict[str, Any]:
    methods = {label: m.summary() for label, m in results.items()}
    for m in methods.values():
        # Share of one core: near 1.0, that single-threaded part caps the throughput.
        per_text = {"client": m["extra"].get("client_cpu_ms_per_text")}
        per_text["event_loop"] = m["extra"].get("server_cpu_ms_per_text", {}).get("event_loop")
        busy = {k: round(v * m["texts_per_s"] / 1000, 2) for k, v in per_text.items() if v is not None}
        if busy:
            m["extra"]["core_busy"] = busy
    return {
        "scenario": name,
        "model": model,
        "torch_threads": threads,
        "methods": methods,
        "ratios": ratios,
        "targets": targets,
    }


# -- scenarios -------------------------------------------------------------------------


def classification(sizes: Sizes, device: str, client: LoadClient, work: Path) -> dict[str, Any]:
    cuda = device == "cuda"
    print("classification: building the model ...", flush=True)
    model_dir = (build_bert_base_classifier if cuda else build_minilm_classifier)(work / "classifier")
    entry: dict[str, Any] = {
        "name": "bench-clf",
        "task": "text-classification",
        "source": {"path": str(model_dir)},
    }
    if cuda:
        entry.update(device="cuda", dtype="float16")
    catalog = write_catalog(work / "classification.yaml", [{**entry, **VARIANT.entry}])
    texts = make_texts(sizes.clf_texts)
    single = texts[: sizes.clf_single]
    bodies = [{"inputs": t, "model": "bench-clf"} for t in texts]
    naive_bodies = [{"inputs": t} for t in texts]
    offline = OfflineModel(model_dir, "classification", device, torch.float16 if cuda else torch.float32)

    with contextlib.ExitStack() as servers:
        served = servers.enter_context(served_server(catalog, work))
        baselines = baseline_servers(servers, catalog, work)
        naive = None if cuda else servers.enter_context(naive_server(model_dir, work))
        print("  warming up ...", flush=True)
        offline.batched(texts[:128], 32)
        offline.lanes(texts[:128], 16, 2)
        offline.sequential(texts[:16])
        runs = {"served": served_runner(client, served, "served", "/classify", bodies, "bench-clf")}
        for label, server in baselines.items():
            runs[label] = served_runner(client, server, label, "/classify", bodies, "bench-clf")
        for server in (served, *baselines.values()):
            client.drive("warm", server.url, "/classify", bodies[:128], 64)

        # Each served server right after the other at one concurrency (every baseline beside this checkout).
        methods: dict[str, Callable[[], Measurement]] = {
            "offline batched (bs 32)": lambda: offline.batched(texts, 32),
            "offline 2 lanes (bs 16)": lambda: offline.lanes(texts, 16, 2, "offline lanes"),
        }
        for label, run in runs.items():
            methods[f"{label} c=64"] = functools.partial(run, len(texts), 64)
        methods["offline single-item"] = lambda: offline.sequential(single)
        for label, run in runs.items():
            methods[f"{label} c=1"] = functools.partial(run, len(single), 1)
        if naive is not None:
            url = naive.url
            client.drive("warm", url, "/classify", naive_bodies[:128], 64)

            def naive_run(n: int, concurrency: int) -> Measurement:
                run = client.drive("naive", url, "/classify", naive_bodies[:n], concurrency, stats_path="/health")
                return naive_stats(run)

            methods["naive c=64"] = lambda: naive_run(len(texts), 64)
            methods["naive c=1"] = lambda: naive_run(len(single), 1)
        threads = torch_threads(offline, served, "bench-clf", naive, baselines)
        results = interleave(sizes.rounds, methods)
    offline.close()

    # The offline limit is the faster of its two ways to run the same sorted batches.
    off = max(results["offline batched (bs 32)"], results["offline 2 lanes (bs 16)"], key=lambda m: m.throughput)
    srv64, srv1 = results["served c=64"], results["served c=1"]
    ratios = {"served/offline c=64": ratio(srv64.throughput, off.throughput)}
    targets = [check("c=64: served / offline batched", ratios["served/offline c=64"], 0.9, ">=")]
    if not cuda:
        ratios["served/naive c=64"] = ratio(srv64.throughput, results["naive c=64"].throughput)
        ratios["served/naive c=1"] = ratio(srv1.throughput, results["naive c=1"].throughput)
        targets.append(check("c=64: served / naive server", ratios["served/naive c=64"], 2.5, ">="))
    targets.append(latency_check(srv1, results["offline single-item"]))
    model = "bert-base size (BertConfig(), random weights), fp16 on cuda" if cuda else "all-MiniLM-L6-v2 + random head"
    model += ", offline: TorchScript forward" if offline.traced else ", offline: eager forward"
    if VARIANT.entry or VARIANT.env:
        model += f"; served variant {VARIANT.entry or ''} {VARIANT.env or ''}".rstrip()
    out = report("classification", model, threads, results, ratios, targets)
    if BASELINES:
        out["baselines"] = compare(results, [64, 1])
    return out


def seq2seq(sizes: Sizes, client: LoadClient, work: Path) -> dict[str, Any]:
    print("seq2seq: building the model ...", flush=True)
    model_dir = build_marian(work / "marian")
    entry = {
        "name": "bench-marian",
        "task": "translation",
        "source_lang": "en",
        "target_lang": "de",
        "source": {"path": str(model_dir)},
    }
    catalog = write_catalog(work / "seq2seq.yaml", [{**entry, **VARIANT.entry}])
    texts = make_texts(sizes.s2s_texts)
    single = texts[: sizes.s2s_single]
    bodies = [{"inputs": t, "model": "bench-marian", "parameters": GENERATION} for t in texts]
    offline = OfflineModel(model_dir, "seq2seq")
    offline.generation = dict(GENERATION)

    with contextlib.ExitStack() as servers:
        served = servers.enter_context(served_server(catalog, work))
        baselines = baseline_servers(servers, catalog, work)
        print("  warming up ...", flush=True)
        offline.batched(texts[:16], 16)
        offline.sequential(texts[:2])
        for server in (served, *baselines.values()):
            client.drive("warm", server.url, "/translate", bodies[:32], 16, warmup=0)
        offline.generated_tokens.clear()
        threads = torch_threads(offline, served, "bench-marian", baselines=baselines)
        runs = {"served": served_runner(client, served, "served", "/translate", bodies, "bench-marian")}
        for label, server in baselines.items():
            runs[label] = served_runner(client, server, label, "/translate", bodies, "bench-marian")

        methods: dict[str, Callable[[], Measurement]] = {"offline batched (bs 16)": lambda: offline.batched(texts, 16)}
        for label, run in runs.items():
            methods[f"{label} c=16"] = functools.partial(run, len(texts), 16)
        methods["sequential generate"] = lambda: offline.sequential(single, "sequential generate")
        for label, run in runs.items():
            methods[f"{label} c=1"] = functools.partial(run, len(single), 1)
        results = interleave(sizes.rounds, methods)
    offline.close()

    off, srv16 = results["offline batched (bs 16)"], results["served c=16"]
    seq = results["sequential generate"]
    ratios = {
        "served/offline c=16": ratio(srv16.throughput, off.throughput),
        "served/sequential c=16": ratio(srv16.throughput, seq.throughput),
    }
    targets = [
        check("c=16: served / offline batched generate", ratios["served/offline c=16"], 0.8, ">="),
        check("c=16: served / sequential generate", ratios["served/sequential c=16"], 3.0, ">="),
        latency_check(results["served c=1"], seq),
    ]
    model = "MarianMT at opus-mt-en-de size, random weights, greedy"
    out = report("seq2seq", model, threads, results, ratios, targets)
    out["generation"] = {
        **GENERATION,
        "offline_generated_tokens_per_text": sorted(set(offline.generated_tokens)),
    }
    if BASELINES:
        out["baselines"] = compare(results, [16, 1])
    return out


# -- output ----------------------------------------------------------------------------


def print_report(out: dict[str, Any]) -> None:
    print(f"\n== {out['scenario']}: {out['model']} (torch threads {out['torch_threads']})")
    width = max(26, *(len(label) + 2 for label in out["methods"]))
    heads = ("texts", "texts/s", "p50 ms", "p95 ms", "p99 ms", "batch", "errors")
    print(f"{'method':<{width}}" + "".join(f"{h:>9}" for h in heads))
    for label, m in out["methods"].items():
        cells = [m["texts"], m["texts_per_s"], m["p50_ms"], m["p95_ms"], m["p99_ms"]]
        cells += [m["extra"].get("mean_batch_size"), m["errors"]]
        print(f"{label:<{width}}" + "".join(f"{_cell(c):>9}" for c in cells))
        if m["extra"].get("first_error"):
            print(f"    first error: {m['extra']['first_error']}")
    print_cpu(out["methods"], width)
    if "baselines" in out:
        print_baselines(out["baselines"], width)
    for key, value in out["ratios"].items():
        print(f"  {key}: {value}")
    for t in out["targets"]:
        print(f"  [{'met ' if t['met'] else 'MISS'}] {t['target']}: {t['value']} (target {t['goal']})")
    if "generation" in out:
        print(f"  generation: {out['generation']}")


def print_baselines(baselines: dict[str, Any], width: int) -> None:
    """Served figures per concurrency: this checkout, each baseline, and this/baseline (texts/s
    above 1 and latency below 1: this checkout is faster)."""
    keys = ("texts_per_s", "p50_ms", "p99_ms")
    print(f"{'served: this vs baseline':<{width}}" + "".join(f"{h:>9}" for h in ("texts/s", "p50 ms", "p99 ms")))
    first = next(iter(baselines.values()))
    for c in [key for key in first if key.startswith("c=")]:
        print(f"{'this checkout ' + c:<{width}}" + "".join(f"{_cell(first[c]['this'][k]):>9}" for k in keys))
        for rev, rows in baselines.items():
            print(
                f"{'baseline ' + rev + ' ' + c:<{width}}" + "".join(f"{_cell(rows[c]['baseline'][k]):>9}" for k in keys)
            )
            print(f"{'  this/' + rev:<{width}}" + "".join(f"{_cell(rows[c]['ratio'][k], 3):>9}" for k in keys))


def print_cpu(methods: dict[str, Any], width: int = 26) -> None:
    """CPU milliseconds per text, by where they were spent, and how busy the single-threaded
    parts were (% of one core): near 100%, the event loop or the client is the bottleneck."""
    columns = ("event_loop", "batcher", "native_pools", "python_threads", "total")
    heads = ("loop", "batcher", "native", "py-thr", "server", "client", "in-proc", "loop%", "client%")
    print(f"{'CPU ms per text':<{width}}" + "".join(f"{h:>9}" for h in heads))
    for label, m in methods.items():
        server = m["extra"].get("server_cpu_ms_per_text", {})
        cells = [server.get(c) for c in columns]
        cells += [m["extra"].get("client_cpu_ms_per_text"), m["extra"].get("cpu_ms_per_text")]
        busy = m["extra"].get("core_busy", {})
        shares = [busy.get("event_loop"), busy.get("client")]
        print(
            f"{label:<{width}}"
            + "".join(f"{_cell(c, 2):>9}" for c in cells)
            + "".join(f"{_cell(None if s is None else 100 * s, 0):>9}" for s in shares)
        )


def _cell(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


# -- command line ----------------------------------------------------------------------


def cpu_list(text: str) -> set[int]:
    """'0,1' or '2-5' or '0,4-7' -> a set of CPU numbers."""
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def pin_and_restart(cpus: set[int]) -> None:
    """Run this script again under ``cpus``, so that torch and the servers start there."""
    if os.environ.get(PINNED_ENV) == "1":
        return
    os.sched_setaffinity(0, cpus)
    os.environ[PINNED_ENV] = "1"
    os.execv(sys.executable, [sys.executable, *sys.argv])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=("all", "classification", "seq2seq", "ceiling"), default="all")
    parser.add_argument("--quick", action="store_true", help="fewer texts and one round")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rounds", type=int, help="rounds per method (default 2, --quick 1)")
    parser.add_argument("--texts", type=int, help="classification texts (default 1536, --quick 384)")
    parser.add_argument("--server-cpus", type=cpu_list, help="pin servers and in-process loops, e.g. 0,1")
    parser.add_argument("--client-cpus", type=cpu_list, help="pin the load client elsewhere, e.g. 2-5")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    parser.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="REV",
        help="also serve this commit (repeatable) from a git worktree, in the same rounds, e.g. 4c6ba77",
    )
    parser.add_argument(
        "--served-entry",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a catalog option for the served model (YAML value), e.g. torchscript=false",
    )
    parser.add_argument(
        "--served-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for the served server, e.g. TESSERA_LANES_PER_MODEL=1",
    )
    args = parser.parse_args(argv)
    commits = {}
    for rev in args.baseline:
        found = subprocess.run(
            ["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=ROOT, capture_output=True, text=True
        )
        if found.returncode != 0:
            parser.error(f"--baseline {rev}: not a commit of {ROOT}")
        commits[rev] = found.stdout.strip()
    for option in args.served_entry:
        key, _, value = option.partition("=")
        VARIANT.entry[key] = yaml.safe_load(value)
    VARIANT.env.update(option.partition("=")[::2] for option in args.served_env)
    if VARIANT.entry or VARIANT.env:
        print(f"served variant: entry {VARIANT.entry}, environment {VARIANT.env}", flush=True)
    # A plain SIGTERM (timeout, Ctrl-C in a container) still stops the server subprocesses.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.server_cpus:
        pin_and_restart(args.server_cpus)

    sizes = QUICK if args.quick else FULL
    sizes.rounds = args.rounds or sizes.rounds
    # A GPU runs bert-base so fast that 1536 texts last well under a second offline.
    sizes.clf_texts = args.texts or (4 * sizes.clf_texts if args.device == "cuda" else sizes.clf_texts)
    scenarios = ["classification", "seq2seq", "ceiling"] if args.scenario == "all" else [args.scenario]
    if "ceiling" in scenarios and (args.device == "cuda" or shutil.which("wrk") is None):
        why = "--device cuda" if args.device == "cuda" else "it needs wrk (Debian/Ubuntu: apt-get install wrk)"
        print(f"the ceiling scenario is skipped: {why}", flush=True)
        scenarios.remove("ceiling")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA GPU here")
        if "seq2seq" in scenarios:
            print("--device cuda runs the classification scenario only", flush=True)
            scenarios = ["classification"]

    # Only the offline worker thread may run torch on several threads (it reads this budget):
    # a second OpenMP pool in this process, such as one left by building a model on the
    # main thread, would slow every multi-threaded offline pass (app/batching/threads.py).
    OfflineModel.threads = torch.get_num_threads()
    torch.set_num_threads(1)

    started = time.monotonic()
    load_before = os.getloadavg()
    if load_before[0] > (os.cpu_count() or 1) / 2:
        print(f"note: load average is {load_before[0]:.1f} before starting; figures will be noisy", flush=True)
    reports = []
    client = LoadClient(args.client_cpus)
    try:
        with contextlib.ExitStack() as stack:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tessera-bench-")))
            if {"classification", "seq2seq"} & set(scenarios):
                # Worktrees (bench/ceiling.py's): each baseline's app/ is served from its own tree.
                BASELINES.extend(
                    Baseline(rev, commits[rev], stack.enter_context(ceiling.checkout(rev))) for rev in commits
                )
            for name in scenarios:
                scenario_started = time.monotonic()
                if name == "ceiling":
                    # bench/ceiling.py: wrk against the server; its own table, kept beside the others.
                    ceiling_out = work / "ceiling.json"
                    ceiling.main(
                        [
                            "--seconds",
                            "5" if args.quick else "10",
                            "--rounds",
                            str(sizes.rounds),
                            "--out",
                            str(ceiling_out),
                            *[option for rev in args.baseline for option in ("--baseline", rev)],
                        ]
                    )
                    reports.append({"scenario": "ceiling", "ways": json.loads(ceiling_out.read_text())})
                    continue
                if name == "classification":
                    out = classification(sizes, args.device, client, work)
                else:
                    out = seq2seq(sizes, client, work)
                out["seconds"] = round(time.monotonic() - scenario_started, 1)
                print_report(out)
                reports.append(out)
    finally:
        client.close()
    total = round(time.monotonic() - started, 1)
    result = {
        "meta": {
            "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
            "quick": args.quick,
            "rounds": sizes.rounds,
            "cpus": os.cpu_count(),
            "server_cpus": sorted(args.server_cpus) if args.server_cpus else "all",
            "client_cpus": sorted(args.client_cpus) if args.client_cpus else "shared with the server",
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "total_seconds": total,
            "commit": subprocess.run(
                ["git", "describe", "--always", "--dirty", "--abbrev=40"], cwd=ROOT, capture_output=True, text=True
            ).stdout.strip(),
            "baselines": commits,
        },
        "served_variant": {"entry": VARIANT.entry, "env": VARIANT.env},
        "scenarios": {r["scenario"]: r for r in reports},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\ntotal {total}s; load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
