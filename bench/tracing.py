"""What tracing costs (docs/tracing.md): the same server with tracing off, on at sampling 1.0
and on at 0.01, side by side, exporting to a live OTLP/HTTP receiver.

    .venv/bin/python bench/tracing.py                        # both models, 2 rounds of 15 s
    .venv/bin/python bench/tracing.py --baseline 4256b3d     # and another commit, served off
    .venv/bin/python bench/tracing.py --model ceiling --seconds 10 --rounds 3

Two models, each under ``wrk`` (one thread, 64 connections, one text per ``/classify``
request, as bench/ceiling.py drives it): ``ceiling``, bench/ceiling.py's 2-layer hidden-32
BERT, whose forward pass costs next to nothing, so what is measured is the server's own
work per request (the tracing SDK's share at its largest); and ``minilm``, the real
all-MiniLM-L6-v2 encoder with a two-label head (bench/run.py's classification model), a
request as a small model serves it. The ways run in turn, the order reversed every other
round. Printed per way: requests per second, the server's CPU per request (every process of
its tree, from /proc) and, apart, the receiver's: a separate process that accepts each
export and discards it. The receiver's CPU is not counted in the server's (a collector runs
elsewhere in production); it is printed so that nothing is hidden. Ratios are against "off".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ceiling import CONNECTIONS, build_ceiling_classifier, checkout, cpu_seconds, measure, server, wrk_script
from servers import ROOT, free_port
from workloads import build_minilm_classifier, make_texts, write_catalog

# The receiver: a plain HTTP server that reads each OTLP export and answers 200 with an empty
# ExportTraceServiceResponse (zero bytes of protobuf), counting what it took.
RECEIVER = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Discard(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Discard).serve_forever()
"""


@contextlib.contextmanager
def receiver() -> Iterator[tuple[str, int]]:
    """The lean OTLP/HTTP receiver, in a process of its own: (its URL, its pid)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", RECEIVER, str(port)])
    try:
        time.sleep(0.5)
        yield f"http://127.0.0.1:{port}", process.pid
    finally:
        process.terminate()
        process.wait(10)


def ways(endpoint: str) -> dict[str, dict[str, str]]:
    traced = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio"}
    return {
        "off": {},
        "on, sampling 1.0": {**traced, "OTEL_TRACES_SAMPLER_ARG": "1.0"},
        "on, sampling 0.01": {**traced, "OTEL_TRACES_SAMPLER_ARG": "0.01"},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("ceiling", "minilm", "both"), default="both")
    parser.add_argument("--baseline", metavar="REV", help="also serve this commit, tracing off")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="for every way")
    parser.add_argument("--seconds", type=float, default=15, help="per measurement (default 15)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    for name in [n for n in os.environ if n.startswith("OTEL_") or n in ("TESSERA_OPENTELEMETRY", "TESSERA_TRACING")]:
        del os.environ[name]  # "off" must be off
    extra = dict(pair.partition("=")[::2] for option in args.env for pair in option.split())
    models = ["ceiling", "minilm"] if args.model == "both" else [args.model]
    table: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tessera-tracing-")))
        endpoint, receiver_pid = stack.enter_context(receiver())
        served = {way: (env, ROOT) for way, env in ways(endpoint).items()}
        if args.baseline:
            served[f"baseline {args.baseline}, off"] = ({}, stack.enter_context(checkout(args.baseline)))
        texts = make_texts(256)
        script = wrk_script(work / "one.lua", [json.dumps({"inputs": t}) for t in texts])
        for model in models:
            build = build_ceiling_classifier if model == "ceiling" else build_minilm_classifier
            path = build(work / model)
            entry = {"name": model, "task": "text-classification", "source": {"path": str(path)}}
            catalog = write_catalog(work / f"{model}.yaml", [entry])
            base = {"TESSERA_CATALOG": str(catalog), "TESSERA_HUB": "offline", "HF_HUB_OFFLINE": "1"}
            base.update({"TESSERA_LOG_LEVEL": "WARNING", **extra})
            for r in range(args.rounds):
                order = list(served) if r % 2 == 0 else list(reversed(served))
                for way in order:
                    env, root = served[way]
                    print(f"{model}, round {r + 1}/{args.rounds}: {way} ...", flush=True)
                    with server(f"{model}-{way.replace(' ', '')}", {**base, **env}, work, root) as proc:
                        before = cpu_seconds([receiver_pid])
                        run = measure(way, proc, "1 text", script, 1, args.seconds)
                        spent = sum(cpu_seconds([receiver_pid]).values()) - sum(before.values())
                    requests = max(1.0, run.requests_per_s * args.seconds)
                    row = table.setdefault(f"{model} | {way}", {"runs": []})
                    row["runs"].append({**run.__dict__, "receiver_cpu_ms_per_request": 1000 * spent / requests})

    print(f"\n{len(os.sched_getaffinity(0))} cores, wrk -t1 -c{CONNECTIONS}, {args.seconds:.0f} s per run, 1 text")
    for key, row in table.items():
        runs = row["runs"]
        row["requests_per_s"] = round(sum(x["requests_per_s"] for x in runs) / len(runs), 1)
        row["cpu_ms_per_request"] = round(sum(x["cpu_ms_per_request"]["total"] for x in runs) / len(runs), 3)
        row["cpu_spread"] = [x["cpu_ms_per_request"]["total"] for x in runs]
        row["receiver_cpu_ms_per_request"] = round(sum(x["receiver_cpu_ms_per_request"] for x in runs) / len(runs), 3)
        row["non_2xx"] = sum(x["non_2xx"] + x["socket_errors"] for x in runs)
        model = key.split(" | ")[0]
        off = table.get(f"{model} | off", {}).get("cpu_ms_per_request")
        ratio = f"{row['cpu_ms_per_request'] / off:.3f}x off" if off else ""
        print(
            f"{key:<40} {row['requests_per_s']:>8} req/s  server {row['cpu_ms_per_request']:>6} CPU ms/req "
            f"(runs {row['cpu_spread']}) {ratio:>10}  receiver {row['receiver_cpu_ms_per_request']} ms/req "
            f"(not counted)  non-2xx {row['non_2xx']}"
        )
    if args.out:
        args.out.write_text(json.dumps(table, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
