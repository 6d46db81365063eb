"""The seq2seq-mixed scenario: translation served with outputs of varied, unpredictable length.

    .venv/bin/python bench/seq2seq_mixed.py --check-model            # the model's output lengths, offline
    .venv/bin/python bench/seq2seq_mixed.py                          # this checkout
    .venv/bin/python bench/seq2seq_mixed.py --baseline 4256b3d       # and that commit, side by side
    .venv/bin/python bench/seq2seq_mixed.py --baseline 4256b3d --rounds 2 --out mixed.json
    .venv/bin/python bench/seq2seq_mixed.py --device cuda --baseline 4256b3d
    .venv/bin/python bench/seq2seq_mixed.py --small --requests 4 --concurrency 1,2   # smoke run

The model is an opus-mt-en-de-sized Marian with random weights whose greedy outputs end
at input-dependent steps between ~40 and ~160 tokens (bench/marian_lengths.py: an eos
bias in ``final_logits_bias``, tuned at build time), served from a catalog entry
(translation, float32, ``--device``) by ``python -m app serve`` in its default layout.
Every request translates one text with the same settings, greedy (``num_beams: 1``) or
beams (``num_beams: 4``, as the opus-mt checkpoints ask), except ``max_new_tokens``, drawn
for each request index from 16, 32, 64, 100 and 160 (seeded): the server cannot know an
answer's length in advance. c clients each send one request at a time (closed loop) from
this process, streamed where the server streams (bench/translate_client.py), else as
plain requests, whose time to first token is then their full latency.

Printed per server, setting and concurrency: output tokens per second (each answer's text
re-tokenized with the model's tokenizer, the same count for every server), time to first
token and full latency p50/p99, the p99 latency of the requests capped at 16 tokens (the
short ones that long ones in their batch may hold up), and failed requests; with
``--baseline REV`` (served from a git worktree of REV, as bench/ceiling.py does, in the
same run, the order of servers reversed every other round), the ratios this / baseline.
``--env "NAME=VALUE ..."`` (repeatable) serves this checkout that way instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch
from ceiling import checkout, server
from marian_lengths import FIRST, LAST, MixedMarian, build_mixed_marian, output_lengths
from servers import ROOT
from transformers import MarianMTModel, MarianTokenizer
from translate_client import Answer, closed_loop, probe
from workloads import SEED, TINY_MARIAN, write_catalog

MODEL = "marian"
CAPS = (16, 32, 64, 100, 160)
SETTINGS = {"greedy": 1, "beams": 4}  # num_beams


def requests_for(texts: list[str], count: int, beams: int) -> list[tuple[int, dict[str, Any]]]:
    """(cap, body) of request 0..count-1: the same for every server, setting and concurrency."""
    caps = random.Random(SEED).choices(CAPS, k=count)
    return [
        (
            cap,
            {
                "inputs": [texts[i % len(texts)]],
                "model": MODEL,
                "parameters": {"num_beams": beams, "max_new_tokens": cap},
            },
        )
        for i, cap in enumerate(caps)
    ]


@dataclass
class Cell:
    """One (server, setting, concurrency): its answers and wall time, over every round."""

    way: str
    setting: str
    concurrency: int
    streamed: bool = False
    answers: list[Answer] = field(default_factory=list)
    wall_s: float = 0.0
    tokens: int = 0

    def figures(self) -> dict[str, float | int | None]:
        ok = [a for a in self.answers if a.ok]
        short = [a.latency_s for a in ok if a.cap == CAPS[0]]
        return {
            "tokens_per_s": self.tokens / self.wall_s if self.wall_s else None,
            "ttft_p50_ms": percentile_ms([a.ttft_s for a in ok], 50),
            "ttft_p99_ms": percentile_ms([a.ttft_s for a in ok], 99),
            "p50_ms": percentile_ms([a.latency_s for a in ok], 50),
            "p99_ms": percentile_ms([a.latency_s for a in ok], 99),
            "p99_cap16_ms": percentile_ms(short, 99),
            "errors": len(self.answers) - len(ok),
        }


def percentile_ms(values: list[float], q: float) -> float | None:
    """Nearest rank, as bench/load.py's."""
    if not values:
        return None
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def run_server(
    way: str, url: str, texts: list[str], args: argparse.Namespace, cells: dict[tuple[str, str, int], Cell]
) -> None:
    """Every (setting, concurrency) cell against one running server."""
    body = {"inputs": [texts[0]], "model": MODEL, "parameters": {"max_new_tokens": 2}}
    streamed, answer = asyncio.run(probe(url, body))
    print(f"  {way}: streaming {'yes' if streamed else 'no'} (the probe got {answer})", flush=True)
    for setting in args.settings:
        warm = requests_for(texts, 2, SETTINGS[setting])
        asyncio.run(closed_loop(url, warm, 1, streamed))  # the first generate's one-off costs
        for c in args.concurrency:
            count = args.requests or max(16, 6 * c)
            answers, wall = asyncio.run(closed_loop(url, requests_for(texts, count, SETTINGS[setting]), c, streamed))
            cell = cells.setdefault((way, setting, c), Cell(way, setting, c))
            cell.streamed, cell.wall_s = streamed, cell.wall_s + wall
            cell.answers += answers
            failed = [a.error for a in answers if not a.ok]
            print(
                f"  {way}, {setting}, c={c}: {count} requests in {wall:.1f} s"
                + (f", {len(failed)} failed (first: {failed[0]})" if failed else ""),
                flush=True,
            )


def fmt(value: float | int | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(cells: dict[tuple[str, str, int], Cell], baselines: list[str]) -> None:
    heads = (
        "server",
        "setting",
        "c",
        "n",
        "out tok/s",
        "TTFT p50",
        "TTFT p99",
        "p50 ms",
        "p99 ms",
        "p99 cap16",
        "errors",
    )
    rows = []
    for (way, setting, c), cell in cells.items():
        f = cell.figures()
        mark = "" if cell.streamed else "*"
        rows.append(
            (
                way,
                setting,
                str(c),
                str(len(cell.answers)),
                fmt(f["tokens_per_s"], 1),
                fmt(f["ttft_p50_ms"]) + mark,
                fmt(f["ttft_p99_ms"]) + mark,
                fmt(f["p50_ms"]),
                fmt(f["p99_ms"]),
                fmt(f["p99_cap16_ms"]),
                str(f["errors"]),
            )
        )
    for rev in baselines:
        base = f"baseline {rev}"
        for (way, setting, c), cell in cells.items():
            if way.startswith("baseline") or (base, setting, c) not in cells:
                continue
            mine, theirs = cell.figures(), cells[(base, setting, c)].figures()

            def ratio(key: str, mine: dict[str, Any] = mine, theirs: dict[str, Any] = theirs) -> str:
                a, b = mine[key], theirs[key]
                return "-" if a is None or not b else f"{a / b:.2f}x"

            rows.append(
                (
                    f"{way} / {rev}",
                    setting,
                    str(c),
                    "",
                    ratio("tokens_per_s"),
                    ratio("ttft_p50_ms"),
                    ratio("ttft_p99_ms"),
                    ratio("p50_ms"),
                    ratio("p99_ms"),
                    ratio("p99_cap16_ms"),
                    f"{mine['errors']} vs {theirs['errors']}",
                )
            )
    widths = [max(len(r[i]) for r in (heads, *rows)) for i in range(len(heads))]
    print()
    for row in (heads, *rows):
        print(
            "  ".join(
                cell.rjust(w) if i > 1 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    if any(not cell.streamed for cell in cells.values()):
        print("* not streamed: that server answers plain JSON, so time to first token is the full latency")


def check_model(mixed: MixedMarian, device: str, texts: int) -> None:
    """Offline: what generate makes of the served texts, greedy and with 4 beams."""
    tokenizer = MarianTokenizer.from_pretrained(str(mixed.path))
    model = MarianMTModel.from_pretrained(str(mixed.path), dtype=torch.float32).to(device).eval()

    def spread(lengths: list[int]) -> str:
        s = sorted(lengths)
        inside = sum(FIRST <= n <= LAST for n in s)
        deciles = ", ".join(str(s[min(len(s) - 1, len(s) * q // 10)]) for q in (1, 5, 9))
        return f"min {s[0]}, p10/p50/p90 {deciles}, max {s[-1]}; {inside}/{len(s)} within {FIRST}..{LAST}"

    print(f"fit of the step direction: r^2 {mixed.fit_r2:.4f}; eos bias {mixed.eos_bias:+.3f}")
    print(f"served texts: {len(mixed.texts)}; predicted greedy lengths (eos included): {spread(mixed.ends)}")
    chosen = mixed.texts[:texts]
    started = time.monotonic()
    greedy = output_lengths(model, tokenizer, chosen, device, num_beams=1)
    print(f"greedy generate, {len(chosen)} texts one at a time ({time.monotonic() - started:.0f} s): {spread(greedy)}")
    print(f"  generated: {greedy}")
    print(f"  predicted: {mixed.ends[: len(chosen)]}")
    started = time.monotonic()
    beamed = output_lengths(model, tokenizer, chosen[: max(1, texts // 3)], device, num_beams=4)
    print(f"4 beams, {len(beamed)} texts ({time.monotonic() - started:.0f} s): {spread(beamed)}")
    print(f"  generated: {beamed}")
    batch = tokenizer(chosen[:4], return_tensors="pt", padding=True).to(device)
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=LAST)
    decoded = tokenizer.batch_decode(out, skip_special_tokens=True)
    counts = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in decoded]
    print(f"re-tokenized answers (what the bench counts) of 4 texts: {counts}; the first: {decoded[0][:80]!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", action="append", default=[], metavar="REV", help="also serve this commit")
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="a way of serving this checkout"
    )
    parser.add_argument("--settings", default="greedy,beams", help="greedy, beams or both (default both)")
    parser.add_argument("--concurrency", default="1,16", help="closed-loop clients, comma-separated (default 1,16)")
    parser.add_argument("--requests", type=int, help="per cell (default: 16 at c=1, 6c above)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--small", action="store_true", help="a one-layer Marian of hidden size 32: the smoke run")
    parser.add_argument("--check-model", action="store_true", help="only build the model and print its lengths")
    parser.add_argument("--check-texts", type=int, default=12, help="texts --check-model generates (default 12)")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    if unknown := set(args.settings) - SETTINGS.keys():
        parser.error(f"--settings: unknown {', '.join(sorted(unknown))} (greedy, beams)")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU here")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the servers stop too
    if args.small:
        # A model this small runs faster on one torch thread than on two busy cores (its ops
        # cost less than a pool's hand-offs; bench/gpu_check.py's dry run measured 20x).
        torch.set_num_threads(1)

    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tessera-s2s-mixed-")))
        started = time.monotonic()
        print("building the model and tuning its lengths ...", flush=True)
        mixed = build_mixed_marian(work / MODEL, TINY_MARIAN if args.small else None, args.device)
        print(f"built in {time.monotonic() - started:.0f} s: {len(mixed.texts)} texts", flush=True)
        if args.check_model:
            check_model(mixed, args.device, args.check_texts)
            return 0
        entry = {
            "name": MODEL,
            "task": "translation",
            "source_lang": "en",
            "target_lang": "de",
            "source": {"path": str(mixed.path)},
            "device": args.device,
            "dtype": "float32",
        }
        base_env = {
            "TESSERA_CATALOG": str(write_catalog(work / "catalog.yaml", [entry])),
            "TESSERA_HUB": "offline",
            "HF_HUB_OFFLINE": "1",
            "TESSERA_LOG_LEVEL": "WARNING",
            "TESSERA_REQUEST_TIMEOUT_S": "600",  # beams at c=16 on a CPU wait long in the queue
            **({"TESSERA_TORCH_THREADS": "1"} if args.small else {}),
        }
        ways: dict[str, tuple[dict[str, str], Path]] = {}
        for option in args.env or [""]:  # "NAME=VALUE", or several separated by spaces
            ways[f"this checkout {option}".strip()] = (dict(p.partition("=")[::2] for p in option.split()), ROOT)
        for rev in args.baseline:
            ways[f"baseline {rev}"] = ({}, stack.enter_context(checkout(rev)))
        cells: dict[tuple[str, str, int], Cell] = {}
        for r in range(args.rounds):
            for way in list(ways) if r % 2 == 0 else list(reversed(ways)):
                env, tree = ways[way]
                print(f"round {r + 1}/{args.rounds}: {way} ...", flush=True)
                with server(way.replace(" ", "-"), {**base_env, **env}, work, tree) as proc:
                    run_server(way, proc.url, mixed.texts, args, cells)
        tokenizer = MarianTokenizer.from_pretrained(str(mixed.path))
        for cell in cells.values():
            texts = [a.text for a in cell.answers if a.ok]
            cell.tokens = (
                sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else 0
            )

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {len(os.sched_getaffinity(0))} cores"
    model = "small Marian (--small)" if args.small else "opus-mt-en-de-sized Marian"
    print(f"\n{model} on {device}; {args.rounds} round(s); {time.monotonic() - started:.0f} s")
    print_table(cells, args.baseline)
    if args.out:
        table = {" | ".join(map(str, key)): {"streamed": c.streamed, **c.figures()} for key, c in cells.items()}
        args.out.write_text(json.dumps(table, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
