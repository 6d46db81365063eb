r"""The GPU check: one command for a GPU machine lent for minutes, one table with the GPU's name.

Tessera runs in its default process layout (``python -m app serve``, TESSERA_WORKERS=1:
the supervisor, one front and the engine) and is checked four ways:

- classify fp16 and bf16: a bert-base-size classifier (random weights) on /classify, one
  text per request at c=64, against the same texts offline in length-sorted batches of 32
  (bench/offline.py), rounds interleaved (bench/run.py); target served/offline >= 0.8x.
- seq2seq (static): Marian at opus-mt-en-de size, exactly 32 new tokens, /translate at c=16
  against offline ``generate`` batches of 16 (fp32). Static batches: mixed lengths are
  bench/seq2seq_mixed.py's (``--device cuda``), served only.
- out of memory: this process takes all but 1 GiB of the GPU's free memory, then sends
  requests of 512 texts of ~450 tokens with batches of up to 512 allowed. The engine's
  forward pass raises a real CUDA out-of-memory error and the batcher halves the batch until
  it fits (app/batching/batcher.py ``_execute``); every input must answer 200, and the
  engine's log must show the splits.
- memory budget: two copies of the classifier under TESSERA_MEMORY_BUDGET_GIB set to 1.2x
  one model's weights on disk; requests to a, then b, then a: loading each unloads the
  least recently used other (GET /models states, the log's evictions), nothing lost.

On the device machine, after bench/gpu_wheels.sh has filled .whl/ here with the serving
stack its image lacks (the run tool carries it: ``carry: [".whl"]``, timeout_s 600):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH && \
        PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --device cuda 2>&1 | tee $OUT/gpu_check.log

Not yet run on a GPU: an estimate is 3-5 minutes there. ``--device cpu --quick`` is the
dry run of the same code on tiny models (tests/test_gpu_check.py runs it in ``make
test``): float32 served vs offline, the fp16/bf16 rows skipped, the out-of-memory
requests sent without the memory taken (no OOM on a CPU: "GPU only"), the budget check
whole. Exit status 1 when a mechanism fails (an answer other than 200, no split on OOM, a
wrong eviction, a server that does not start); ratios below their target are reported,
not failures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import torch
from load import LoadClient, Measurement
from offline import OfflineModel
from run import GENERATION, interleave, ratio
from servers import ServerProcess
from transformers import BertConfig
from workloads import (
    TINY_MARIAN,
    WORDS,
    build_bert_base_classifier,
    build_marian,
    make_texts,
    marian_config,
    write_catalog,
)

TARGET_RATIO = 0.8
HEADROOM_GIB = 1.0  # GPU memory left free for the engine during the out-of-memory check
LONG_TEXT_WORDS = 450  # one token each (workloads.bench_wordpiece_tokenizer): under bert's 512
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


@dataclass
class Sizes:
    """How much each check runs; --quick shrinks it to a dry run."""

    clf_texts: int
    s2s_texts: int
    rounds: int
    oom_texts: int  # texts per out-of-memory request, and the largest batch allowed
    budget_requests: int  # per phase of the budget check


FULL = Sizes(clf_texts=4096, s2s_texts=64, rounds=2, oom_texts=512, budget_requests=64)
QUICK = Sizes(clf_texts=128, s2s_texts=8, rounds=1, oom_texts=16, budget_requests=16)


@dataclass
class Row:
    check: str
    figure: str
    target: str
    verdict: str  # met, MISS, skipped: CPU, GPU only
    failed: bool = False  # a mechanism that did not work (not a figure below its target)


# -- servers ---------------------------------------------------------------------------------


def serve(name: str, catalog: Path, work: Path, env: dict[str, str] | None = None) -> ServerProcess:
    """``python -m app serve`` in its default layout: one front and the engine."""
    settings = {
        "TESSERA_CATALOG": str(catalog),
        "TESSERA_HUB": "offline",
        "HF_HUB_OFFLINE": "1",
        "TESSERA_WORKERS": "1",
        **(env or {}),
    }
    args = ["-m", "app", "serve", "--host", "127.0.0.1", "--port", "{port}"]
    return ServerProcess(name, args, settings, "/health/ready", work, timeout_s=300)


def model_states(server: ServerProcess) -> dict[str, str]:
    models = httpx.get(server.url + "/models", timeout=30).json()["models"]
    return {m["name"]: m["state"] for m in models}


def weights_bytes(path: Path) -> int:
    """What the registry's budget expects a load to take: the weights on disk."""
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


@contextlib.contextmanager
def gpu_memory_taken(device: str, headroom_gib: float) -> Iterator[str]:
    """All of the GPU's free memory but ``headroom_gib``, held by this process (another
    tenant, to the server); nothing on a CPU. Yields what it did, for the table."""
    if device != "cuda":
        yield "no memory taken (CPU)"
        return
    free, total = torch.cuda.mem_get_info()
    taken = max(0, free - int(headroom_gib * 2**30))
    for _ in range(4):  # one block that large may not be had at once: a little less, then
        try:
            filler = torch.empty(taken, dtype=torch.uint8, device="cuda")
            break
        except torch.OutOfMemoryError:
            taken = max(0, taken - 2**28)
    else:
        filler = None
        taken = 0
    try:
        yield f"{(free - taken) / 2**30:.1f} of {total / 2**30:.0f} GiB left free"
    finally:
        del filler
        torch.cuda.empty_cache()


# -- checks ----------------------------------------------------------------------------------


def served_vs_offline(
    label: str,
    client: LoadClient,
    server: ServerProcess,
    offline: OfflineModel,
    route: str,
    bodies: list[dict[str, Any]],
    texts: list[str],
    batch: int,
    concurrency: int,
    rounds: int,
) -> Row:
    """Served at ``concurrency`` against offline batches of ``batch``, the same texts."""
    print(f"{label}: warming up ...", flush=True)
    offline.batched(texts[: 2 * batch], batch)
    client.drive("warm", server.url, route, bodies[: 2 * concurrency], concurrency)
    methods = {
        f"offline (bs {batch})": lambda: offline.batched(texts, batch),
        f"served c={concurrency}": lambda: client.drive(label, server.url, route, bodies, concurrency),
    }
    results = interleave(rounds, methods)
    off, served = results[f"offline (bs {batch})"], results[f"served c={concurrency}"]
    value = ratio(served.throughput, off.throughput)
    shown = "-" if value is None else f"{value:.2f}x"
    figure = f"{shown} ({served.throughput:.0f} vs {off.throughput:.0f} texts/s, served p50 {_ms(served)})"
    target = f">= {TARGET_RATIO}x"
    if served.errors:
        why = served.extra.get("first_error", "")[:80]
        return Row(label, f"{figure}; {served.errors} errors: {why}", target, "MISS", failed=True)
    return Row(label, figure, target, "met" if value is not None and value >= TARGET_RATIO else "MISS")


def _ms(m: Measurement) -> str:
    p50 = m.percentile_ms(50)
    return "-" if p50 is None else f"{p50:.1f} ms"


def classification_rows(
    device: str, sizes: Sizes, client: LoadClient, server: ServerProcess, model_dir: Path, dtypes: list[str]
) -> list[Row]:
    texts = make_texts(sizes.clf_texts)
    rows = []
    for dtype in ("float16", "bfloat16", "float32"):
        label = f"classify {dtype} c=64: served/offline"
        if dtype not in dtypes:
            if dtype != "float32":
                rows.append(Row(label, "-", f">= {TARGET_RATIO}x", "skipped: CPU"))
            continue
        bodies = [{"inputs": t, "model": f"clf-{dtype}"} for t in texts]
        offline = OfflineModel(model_dir, "classification", device, getattr(torch, dtype))
        try:
            rows.append(
                served_vs_offline(label, client, server, offline, "/classify", bodies, texts, 32, 64, sizes.rounds)
            )
        finally:
            offline.close()
            del offline
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def seq2seq_row(device: str, sizes: Sizes, client: LoadClient, server: ServerProcess, model_dir: Path) -> Row:
    texts = make_texts(sizes.s2s_texts)
    bodies = [{"inputs": t, "model": "marian", "parameters": GENERATION} for t in texts]
    offline = OfflineModel(model_dir, "seq2seq", device, torch.float32)
    offline.generation = dict(GENERATION)
    try:
        row = served_vs_offline(
            "seq2seq (static) c=16: served/offline",
            client,
            server,
            offline,
            "/translate",
            bodies,
            texts,
            16,
            16,
            sizes.rounds,
        )
    finally:
        offline.close()
    generated = sorted(set(offline.generated_tokens))
    if generated != [GENERATION["max_new_tokens"]]:
        row.figure += f"; offline generated {generated} tokens, not {GENERATION['max_new_tokens']}"
    return row


def split_batches(log: Path, model: str) -> list[tuple[int, str]]:
    """The batches the engine split after a failure (app/batching/batcher.py's warning):
    their sizes and why they failed."""
    # The rest of the line: an error's message may run over several.
    pattern = re.compile(rf"batch of (\d+) failed on {re.escape(model)} \((.*)")
    return [(int(m[1]), m[2]) for m in pattern.finditer(log.read_text(errors="replace"))]


def out_of_memory_row(device: str, sizes: Sizes, server: ServerProcess, model: str) -> Row:
    """Requests whose batches do not fit in the GPU memory left: all answered after splits."""
    label = f"OOM: {sizes.oom_texts}-text batches, halved"
    rng = random.Random(7)
    long_texts = [" ".join(rng.choice(WORDS) for _ in range(LONG_TEXT_WORDS)) + "." for _ in range(sizes.oom_texts)]
    body = {"inputs": long_texts, "model": model}
    ok = httpx.post(server.url + "/classify", json={"inputs": WORDS[0], "model": model}, timeout=300)
    if ok.status_code != 200:
        return Row(label, f"first request {ok.status_code}: {ok.text[:80]}", "all 200", "MISS", failed=True)
    answered = total = 0
    with gpu_memory_taken(device, HEADROOM_GIB) as taken:
        print(f"out of memory: {taken}; sending 2 requests of {sizes.oom_texts} long texts ...", flush=True)
        for _ in range(2):
            total += len(body["inputs"])
            answer = httpx.post(server.url + "/classify", json=body, timeout=300)
            if answer.status_code == 200:
                answered += len(answer.json()["results"])
            else:
                print(f"  answered {answer.status_code}: {answer.text[:300]}", flush=True)
    splits = split_batches(server.log_path, model)
    on_oom = [size for size, why in splits if "out of memory" in why.lower()]
    sizes_split = sorted(set(on_oom), reverse=True)
    figure = f"{answered}/{total} answered; {len(on_oom)} splits on OOM"
    figure += f" (batches of {', '.join(map(str, sizes_split))})" if sizes_split else ""
    if len(splits) > len(on_oom):
        figure += f"; {len(splits) - len(on_oom)} splits for other errors"
    lost = answered != total
    if device != "cuda":
        return Row(label, f"{figure}; {taken}", "all 200 after >= 1 split", "GPU only", failed=lost)
    verdict = "met" if not lost and on_oom else "MISS"
    return Row(label, f"{figure}; {taken}", "all 200 after >= 1 split", verdict, failed=verdict != "met")


def budget_row(sizes: Sizes, client: LoadClient, server: ServerProcess, budget_gib: float) -> Row:
    """a (loaded by the out-of-memory check), then b, then a: each load unloads the other."""
    label = f"memory budget {budget_gib:.3g} GiB: a -> b -> a"
    texts = make_texts(sizes.budget_requests, seed=11)
    states = [model_states(server)]
    lost = 0
    for name in ("budget-b", "budget-a"):
        bodies = [{"inputs": t, "model": name} for t in texts]
        lost += client.drive(f"budget {name}", server.url, "/classify", bodies, 8, warmup=0).errors
        states.append(model_states(server))
    expected = [
        {"budget-a": "loaded", "budget-b": "not_loaded"},
        {"budget-a": "not_loaded", "budget-b": "loaded"},
        {"budget-a": "loaded", "budget-b": "not_loaded"},
    ]
    evictions = server.log_path.read_text(errors="replace").count("evicting idle model")
    loaded = " -> ".join("+".join(n[-1] for n in sorted(s) if s[n] == "loaded") or "none" for s in states)
    figure = f"loaded: {loaded}; {evictions} evictions; {2 * len(texts) - lost}/{2 * len(texts)} answered"
    ok = states == expected and evictions == 2 and lost == 0
    return Row(label, figure, "LRU unloaded, all 200", "met" if ok else "MISS", failed=not ok)


# -- the run ---------------------------------------------------------------------------------


def print_table(title: str, rows: list[Row]) -> None:
    heads = ("check", "figure", "target", "")
    cells = [heads, *[(r.check, r.figure, r.target, r.verdict) for r in rows]]
    widths = [max(len(c[i]) for c in cells) for i in range(len(heads))]
    print(f"\n== {title}")
    for line in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny models and few texts: the dry run")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU here")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the servers stop too
    sizes = QUICK if args.quick else FULL
    cuda = args.device == "cuda"
    dtypes = ["float16", "bfloat16"] if cuda else ["float32"]
    if cuda:
        title = f"GPU check: {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    else:
        title = f"GPU check, dry run on the CPU (torch {torch.__version__})"
    title += ", tiny models (--quick)" if args.quick else ""
    # Offline passes run on OfflineModel's worker thread with all of torch's threads (bench/run.py);
    # the dry run's tiny models on one: their ops are so small that a pool's hand-offs cost
    # more than they do (Marian at hidden size 32 on 2 busy cores: 1.8 texts/s on 2 threads, 40 on 1).
    OfflineModel.threads = 1 if args.quick and not cuda else torch.get_num_threads()
    torch.set_num_threads(1)

    started = time.monotonic()
    rows: list[Row] = []
    client = LoadClient()
    try:
        with tempfile.TemporaryDirectory(prefix="tessera-gpu-check-") as tmp:
            work = Path(tmp)
            print("building the models ...", flush=True)
            bert = BertConfig(**TINY_BERT) if args.quick else None
            clf_dir = build_bert_base_classifier(work / "classifier", bert)
            marian = marian_config(**TINY_MARIAN) if args.quick else None
            marian_dir = build_marian(work / "marian", marian)
            source = {"path": str(clf_dir)}
            entries: list[dict[str, Any]] = [
                {"name": f"clf-{d}", "task": "text-classification", "source": source, "device": args.device, "dtype": d}
                for d in dtypes
            ]
            entries.append(
                {
                    "name": "marian",
                    "task": "translation",
                    "source_lang": "en",
                    "target_lang": "de",
                    "source": {"path": str(marian_dir)},
                    "device": args.device,
                    "dtype": "float32",
                }
            )
            print("starting the server (served vs offline) ...", flush=True)
            with serve("served", write_catalog(work / "served.yaml", entries), work) as server:
                rows += classification_rows(args.device, sizes, client, server, clf_dir, dtypes)
                rows.append(seq2seq_row(args.device, sizes, client, server, marian_dir))

            budget_gib = 1.2 * weights_bytes(clf_dir) / 2**30
            dtype = "float16" if cuda else "float32"
            budgeted = [
                {"name": n, "task": "text-classification", "source": source, "device": args.device, "dtype": dtype}
                for n in ("budget-a", "budget-b")
            ]
            tokens = str(sizes.oom_texts * 512)
            env = {
                "TESSERA_MAX_BATCH_SIZE": str(sizes.oom_texts),
                "TESSERA_MAX_INPUTS_PER_REQUEST": str(sizes.oom_texts),
                "TESSERA_MAX_BATCH_TOKENS": tokens,
                "TESSERA_MAX_TOKENS_PER_REQUEST": tokens,
                "TESSERA_MEMORY_BUDGET_GIB": json.dumps({"cuda:0" if cuda else "cpu": budget_gib}),
            }
            catalog = write_catalog(work / "budget.yaml", [{**e, "preload": False} for e in budgeted])
            print("starting the server (out of memory, memory budget) ...", flush=True)
            with serve("budget", catalog, work, env) as server:
                rows.append(out_of_memory_row(args.device, sizes, server, "budget-a"))
                rows.append(budget_row(sizes, client, server, budget_gib))
    finally:
        client.close()
    print_table(title, rows)
    failed = [r.check for r in rows if r.failed]
    print(
        f"\n{time.monotonic() - started:.0f} s; "
        + (f"FAILED: {', '.join(failed)}" if failed else "no mechanism failed")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
