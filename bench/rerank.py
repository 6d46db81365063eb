"""Reranking served by Tessera and by Infinity 0.0.78, side by side on the same cross-encoder.

    bench/infinity_env.sh                                    # once: Infinity's own virtualenv
    bench/infinity_env.sh --bettertransformer                # optional: its BetterTransformer torch engine
    .venv/bin/python bench/rerank.py                         # every way, 2 rounds of 15 s
    .venv/bin/python bench/rerank.py --rounds 1 --seconds 3  # smoke run
    .venv/bin/python bench/rerank.py --dry-run               # no Infinity, no wrk (tests/test_rerank_bench.py)

One model directory both servers load: all-MiniLM-L6-v2's real encoder with a random one-label
head (workloads.build_minilm_cross_encoder), and beside it the ``model.onnx`` optimum exports
from it in Infinity's environment (Infinity's optimum engine runs an ONNX file it finds in the
directory; it exports none). Each request is one query of 5-15 words and 16 documents of 5-60
words, scored by the sigmoid of the logit on both servers (their default): Tessera's
``POST /rerank`` (TEI's body), Infinity's ``POST /rerank`` (``documents``). One server at a time,
each way once per round, the order reversed every other round; ``wrk`` (C, one thread) first
warms each server up at c=16, then measures the p50 of single requests (c=1) and documents per
second at c=16 (16 per request). Both servers batch up to 32 pairs per forward pass: Infinity's
default ``--batch-size``, Tessera's ``TESSERA_MAX_BATCH_SIZE``. Once per way, a few requests
with raw scores check that each server ranks the documents as Tessera's torch backend does.
Prints one table, Tessera torch against the best Infinity float32 engine per metric with the
targets (printed, not asserted), int8 apart; writes bench/results/rerank.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ceiling import parse_wrk_arguments, server, wrk, wrk_script
from servers import ROOT, ServerProcess
from workloads import SEED, build_minilm_cross_encoder, make_texts, write_catalog

from app.catalog import load_catalog

DOCUMENTS = 16  # per request
CONNECTIONS = 16
REQUESTS = 32  # distinct bodies wrk cycles through
CHECKED = 4  # requests whose rankings are compared across servers
BATCH = 32  # pairs per forward pass, on both servers
WRK_TIMEOUT_S = 60
SERVED_NAME = "minilm-cross-encoder"
TARGET_DOCS = 1.3  # Tessera torch c=16 documents/s over the best Infinity float32 engine's
TARGET_P50 = 1.0  # Tessera torch c=1 p50 over the best Infinity float32 engine's

TESSERA = {
    "tessera torch": {"backend": "torch"},
    "tessera onnx": {"backend": "onnx"},
    "tessera onnx int8": {"backend": "onnx", "quantize": "int8"},
}
# way: (environment, engine); every one float32
INFINITY = {
    "infinity torch": ("default", "torch"),
    "infinity optimum": ("default", "optimum"),
    "infinity torch+bt": ("bettertransformer", "torch"),
}


def make_requests(count: int) -> list[tuple[str, list[str]]]:
    """``count`` (query, 16 documents) pairs, the same for every run."""
    documents = make_texts(count * DOCUMENTS)
    rng = random.Random(SEED + 3)
    queries = [" ".join(t.split()[: rng.randint(5, 15)]).rstrip(".!?") + "?" for t in make_texts(count, SEED + 3)]
    return [(q, documents[i * DOCUMENTS : (i + 1) * DOCUMENTS]) for i, q in enumerate(queries)]


def body(way: str, query: str, documents: list[str], raw: bool = False) -> dict[str, Any]:
    if way.startswith("tessera"):
        return {"query": query, "texts": documents, "raw_scores": raw, "return_text": False}
    return {"query": query, "documents": documents, "raw_scores": raw, "return_documents": False}


def ranked(url: str, sent: dict[str, Any]) -> list[tuple[int, float]]:
    """(document index, score), best first, from either server's answer."""
    answer = httpx.post(url, json=sent, timeout=120)
    answer.raise_for_status()
    got = answer.json()
    items = got["results"] if isinstance(got, dict) else got  # Infinity: Cohere's shape; Tessera: TEI's
    return [(r["index"], r["score"] if "score" in r else r["relevance_score"]) for r in items]


def check(way: str, url: str, requests: list[tuple[str, list[str]]]) -> dict[str, Any]:
    """Raw logits of the first CHECKED requests by document, and what the default score is."""
    logits = []
    for query, documents in requests[:CHECKED]:
        got = ranked(url, body(way, query, documents, raw=True))
        assert len(got) == DOCUMENTS, got
        logits.append([score for _, score in sorted(got)])
    default = dict(ranked(url, body(way, *requests[0])))
    sigmoid = max(abs(default[i] - 1 / (1 + math.exp(-x))) for i, x in enumerate(logits[0]))
    raw = max(abs(default[i] - x) for i, x in enumerate(logits[0]))
    activation = "sigmoid" if sigmoid < 1e-5 else "none" if raw < 1e-5 else "other"
    return {"logits": logits, "default_activation": activation}


def agreement(checks: dict[str, dict[str, Any]], reference: str = "tessera torch") -> dict[str, dict[str, Any]]:
    """Per way: in how many checked requests it orders all documents as ``reference`` does, and
    puts the same one first, and the largest logit difference (the random head's logits lie close
    together: compare it with ``spread``, the reference's median best-minus-worst logit)."""
    base = checks[reference]["logits"]
    spread = median(max(a) - min(a) for a in base)
    out = {}
    for way, got in checks.items():
        if way == reference:
            continue
        orders = [
            (sorted(range(DOCUMENTS), key=lambda i, a=a: -a[i]), sorted(range(DOCUMENTS), key=lambda i, b=b: -b[i]))
            for a, b in zip(base, got["logits"], strict=True)
        ]
        diff = max(abs(x - y) for a, b in zip(base, got["logits"], strict=True) for x, y in zip(a, b, strict=True))
        out[way] = {
            "same_order": f"{sum(x == y for x, y in orders)}/{len(base)}",
            "same_best": f"{sum(x[0] == y[0] for x, y in orders)}/{len(base)}",
            "max_logit_diff": float(f"{diff:.2g}"),
            "spread": float(f"{spread:.2g}"),
        }
    return out


# -- the servers ----------------------------------------------------------------------------


def infinity_python(venv: Path) -> Path | None:
    python = venv / "bin" / "python"
    if not python.exists():
        return None
    found = subprocess.run([python, "-c", "import infinity_emb"], capture_output=True).returncode == 0
    return python if found else None


def export_onnx(python: Path, model: Path, work: Path) -> None:
    """model.onnx beside the weights, exported by optimum (as Infinity's docs ask for its
    optimum engine). Only model.onnx is kept: the exporter also rewrites the tokenizer files."""
    out = work / "onnx-export"
    cli = python.parent / "optimum-cli"
    command = [cli, "export", "onnx", "--model", model, "--task", "text-classification", out]
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    shutil.move(out / "model.onnx", model / "model.onnx")


def infinity_server(way: str, python: Path, engine: str, model: Path, work: Path) -> ServerProcess:
    # "--model-id ." from the model directory: Infinity 0.0.78 hands optimum 2 the ONNX file's
    # path as it globbed it, and optimum 2 matches that against file names only, so any other
    # spelling of a local directory fails to load ("Could not find any ONNX files with target
    # file name /.../model.onnx"). The torch engine is served the same way.
    args = ["-m", "infinity_emb.cli", "v2", "--model-id", ".", "--served-model-name", SERVED_NAME]
    args += ["--engine", engine, "--device", "cpu", "--dtype", "float32", "--batch-size", str(BATCH)]
    args += ["--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning"]
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(work / "hf"), "DO_NOT_TRACK": "1"}
    name = way.replace(" ", "-")
    return ServerProcess(name, args, env, "/health", work, timeout_s=300, cwd=model, python=str(python))


def tessera_server(way: str, model: Path, work: Path) -> ServerProcess:
    entry = {"name": SERVED_NAME, "task": "rerank", "source": {"path": str(model)}, **TESSERA[way]}
    catalog = write_catalog(work / f"{way.replace(' ', '-')}.yaml", [entry])
    env = {
        "TESSERA_CATALOG": str(catalog),
        "TESSERA_HUB": "offline",
        "HF_HUB_OFFLINE": "1",
        "TESSERA_LOG_LEVEL": "WARNING",
        "TESSERA_ONNX_CACHE": str(work / "onnx-cache"),
        "TESSERA_MAX_BATCH_SIZE": str(BATCH),
    }
    return server(way.replace(" ", "-"), env, work, ROOT)


def versions(python: Path) -> dict[str, str]:
    names = ["infinity_emb", "torch", "transformers", "sentence-transformers", "optimum", "onnxruntime"]
    code = "import importlib.metadata as m, json, sys\nout = {}\nfor n in sys.argv[1:]:\n"
    code += "    try: out[n] = m.version(n)\n    except m.PackageNotFoundError: pass\nprint(json.dumps(out))"
    return dict(json.loads(subprocess.run([python, "-c", code, *names], capture_output=True, text=True).stdout))


# -- one run ---------------------------------------------------------------------------------


def measure(url: str, script: Path, seconds: float) -> dict[str, Any]:
    # A request of 16 pairs at c=16 waits behind 15 others: on 2 busy cores that can pass wrk's
    # default 2 s limit, which would drop the slowest answers from the latencies.
    wrk(url, script, min(3.0, seconds), connections=CONNECTIONS, timeout_s=WRK_TIMEOUT_S)  # warm-up
    one = wrk(url, script, seconds, connections=1, timeout_s=WRK_TIMEOUT_S)
    many = wrk(url, script, seconds, connections=CONNECTIONS, timeout_s=WRK_TIMEOUT_S)
    return {
        "c1_p50_ms": round(one["p50_ms"], 2),
        "c16_docs_per_s": round(many["requests_per_s"] * DOCUMENTS, 1),
        "c16_p50_ms": round(many["p50_ms"], 2),
        "non_2xx": one["non_2xx"] + many["non_2xx"] + one["socket_errors"] + many["socket_errors"],
    }


def dry_answers(way: str, url: str, requests: list[tuple[str, list[str]]]) -> None:
    """Every prepared body once: 16 documents answered, best first."""
    for query, documents in requests:
        scores = [score for _, score in ranked(url, body(way, query, documents))]
        assert len(scores) == DOCUMENTS and scores == sorted(scores, reverse=True), scores
    print(f"dry run: {way} answered {len(requests)} requests of {DOCUMENTS} documents, best first")


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    return {
        way: {
            "c1_p50_ms": round(median(r["c1_p50_ms"] for r in got), 2),
            "c16_docs_per_s": round(median(r["c16_docs_per_s"] for r in got), 1),
            "c16_p50_ms": round(median(r["c16_p50_ms"] for r in got), 2),
            "ready_s": [r["ready_s"] for r in got],
            "non_2xx": sum(r["non_2xx"] for r in got),
            "rounds": got,
        }
        for way, got in runs.items()
        if got
    }


def report(table: dict[str, dict[str, Any]], checks: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict:
    if table:
        print(f"\nrerank: 1 query + {DOCUMENTS} documents of 5-60 words per request, wrk -t1, {args.seconds:.0f} s per")
        print(f"measurement, {args.rounds} rounds (medians), batches of up to {BATCH} pairs on both servers")
        print(f"{'way':<20} {'c=1 p50 ms':>10} {'c=16 docs/s':>12} {'c=16 p50 ms':>12} {'ready s':>14}  non-2xx")
        for way, row in table.items():
            ready = ", ".join(f"{s:.0f}" for s in row["ready_s"])
            print(
                f"{way:<20} {row['c1_p50_ms']:>10.2f} {row['c16_docs_per_s']:>12.1f} {row['c16_p50_ms']:>12.2f} "
                f"{ready:>14}  {row['non_2xx']}"
            )
    ratios: dict[str, Any] = {}
    infinity = {w: r for w, r in table.items() if w.startswith("infinity")}
    if infinity and "tessera torch" in table:
        best_rate = max(infinity, key=lambda w: infinity[w]["c16_docs_per_s"])
        best_p50 = min(infinity, key=lambda w: infinity[w]["c1_p50_ms"] or math.inf)  # 0: none answered
        print(f"\nagainst the best Infinity float32 engine per metric (c=16: {best_rate}; c=1: {best_p50})")
        for way in ("tessera torch", "tessera onnx", "tessera onnx int8"):
            if way not in table:
                continue
            docs = table[way]["c16_docs_per_s"] / (infinity[best_rate]["c16_docs_per_s"] or math.nan)
            p50 = table[way]["c1_p50_ms"] / (infinity[best_p50]["c1_p50_ms"] or math.nan)
            ratios[way] = {"c16_docs_per_s": round(docs, 2), "c1_p50": round(p50, 2)}
            if way == "tessera torch":
                verdicts = ("met" if docs >= TARGET_DOCS else "MISS", "met" if p50 <= TARGET_P50 else "MISS")
                print(
                    f"  {way} (the target): c=16 docs/s {docs:.2f}x (target >= {TARGET_DOCS}x: {verdicts[0]}), "
                    f"c=1 p50 {p50:.2f}x (target <= {TARGET_P50}x: {verdicts[1]})"
                )
            else:
                apart = "int8" if "int8" in way else "another backend"
                print(f"  {way} (apart: {apart}): c=16 docs/s {docs:.2f}x, c=1 p50 {p50:.2f}x")
    agree = agreement(checks) if "tessera torch" in checks else {}
    if checks:
        activations = ", ".join(f"{w} {c['default_activation']}" for w, c in checks.items())
        print(f"\nscores: default activation {activations}")
    for way, got in agree.items():
        print(
            f"  {way} vs tessera torch: same order in {got['same_order']} requests, same best in "
            f"{got['same_best']}, max |logit diff| {got['max_logit_diff']} (logit spread {got['spread']})"
        )
    return {"ratios": ratios, "agreement": agree}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    venvs = ROOT / ".bench-venvs"
    parser.add_argument("--infinity", type=Path, default=venvs / "infinity", help="bench/infinity_env.sh's DIR")
    parser.add_argument("--infinity-bt", type=Path, default=venvs / "infinity-bt", help="its --bettertransformer DIR")
    parser.add_argument("--ways", help="comma-separated subset, e.g. 'tessera torch,infinity torch'")
    parser.add_argument(
        "--dry-run", action="store_true", help="build everything, serve Tessera torch, post each body once"
    )
    args = parse_wrk_arguments(parser, argv)
    out = args.out or (None if args.dry_run else ROOT / "bench" / "results" / "rerank.json")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the servers stop too

    pythons = {"default": infinity_python(args.infinity), "bettertransformer": infinity_python(args.infinity_bt)}
    ways = [*TESSERA, *INFINITY]
    if args.ways:
        ways = [w.strip() for w in args.ways.split(",")]
        unknown = set(ways) - set(TESSERA) - set(INFINITY)
        if unknown:
            parser.error(f"unknown ways {sorted(unknown)}; the ways are {[*TESSERA, *INFINITY]}")
    if args.dry_run:
        ways, args.rounds = ["tessera torch"], 1
    for way in [w for w in ways if w in INFINITY and pythons[INFINITY[w][0]] is None]:
        where = args.infinity if INFINITY[way][0] == "default" else args.infinity_bt
        option = "" if INFINITY[way][0] == "default" else " --bettertransformer"
        print(f"skipped: {way}, no Infinity in {where} (bench/infinity_env.sh{option})")
        ways.remove(way)

    requests = make_requests(REQUESTS)
    runs: dict[str, list[dict[str, Any]]] = {way: [] for way in ways}
    checks: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="tessera-rerank-") as tmp:
        work = Path(tmp)
        model = build_minilm_cross_encoder(work / "model")
        if pythons["default"] is not None and "infinity optimum" in ways:
            export_onnx(pythons["default"], model, work)
        for way in TESSERA:  # every catalog checked, served or not
            entry = {"name": SERVED_NAME, "task": "rerank", "source": {"path": str(model)}, **TESSERA[way]}
            load_catalog(write_catalog(work / "check.yaml", [entry]))
        scripts = {
            kind: wrk_script(work / f"{kind}.lua", [json.dumps(body(kind, q, d)) for q, d in requests])
            for kind in ("tessera", "infinity")
        }
        for r in range(args.rounds):
            for way in ways if r % 2 == 0 else list(reversed(ways)):
                print(f"round {r + 1}/{args.rounds}: {way} ...", flush=True)
                kind = way.split()[0]
                if kind == "tessera":
                    proc = tessera_server(way, model, work)
                else:
                    environment, engine = INFINITY[way]
                    python = pythons[environment]
                    assert python is not None
                    proc = infinity_server(way, python, engine, model, work)
                started = time.monotonic()
                with proc:
                    ready_s = round(time.monotonic() - started, 1)
                    url = proc.url + "/rerank"
                    if way not in checks:
                        checks[way] = check(way, url, requests)
                    if args.dry_run:
                        dry_answers(way, url, requests)
                        continue
                    runs[way].append({"ready_s": ready_s, **measure(url, scripts[kind], args.seconds)})

    summary = report(summarise(runs), checks, args)
    if out:
        infinity = {env: versions(p) for env, p in pythons.items() if p is not None}
        record = {"ways": summarise(runs), **summary, "checks": checks, "infinity_versions": infinity}
        record["settings"] = {"seconds": args.seconds, "rounds": args.rounds, "batch": BATCH, "documents": DOCUMENTS}
        Path(out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
