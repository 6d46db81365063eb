"""Packed vs padded forward passes, side by side on the same batches (no HTTP, no batcher).

    .venv/bin/python bench/packing.py [--rounds 3] [--model minilm|distilbert]

The classification scenario's MiniLM classifier (or, with ``--model distilbert``, a
distilbert-base-size classifier with random weights) runs three kinds of batch, each through
its padded TorchScript forward and through the forward the server runs (which packs a
batch whose padding is over 4 % of its real tokens, app/runners/forward.py), alternating
for ``--rounds`` rounds on one torch thread, as a lane under load runs:

- sorted 16: the offline loop's batches (all texts sorted by length, 16 at a time);
- served 9: what the batcher forms at concurrency 64, about 9 neighbours by length from
  the ~46 texts waiting (a window of 9 from a random 46, sorted);
- unsorted 32: 32 texts of mixed lengths in one batch, as a loop that does not sort runs them.

It prints CPU ms per text and the ratio padded / served forward (above 1: packing pays).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from workloads import build_distilbert_classifier, build_minilm_classifier, make_texts

from app.runners.forward import encoder_forward
from app.runners.tokens import pad_rows

Batch = dict[str, torch.Tensor]
BUILDERS = {"minilm": build_minilm_classifier, "distilbert": build_distilbert_classifier}


def batch_shapes(rows: list[list[int]], seed: int = 0) -> dict[str, list[list[int]]]:
    """Row indices of each kind of batch (see the module docstring)."""
    rng = random.Random(seed)
    by_length = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    served = []
    for _ in range(len(rows) // 9):
        pool = sorted(rng.sample(range(len(rows)), 46), key=lambda i: len(rows[i]))
        start = rng.randrange(0, len(pool) - 9 + 1)
        served.append(pool[start : start + 9])
    return {
        "sorted 16": [by_length[at : at + 16] for at in range(0, len(rows), 16)],
        "served 9": served,
        "unsorted 32": [rng.sample(range(len(rows)), 32) for _ in range(len(rows) // 32)],
    }


def cpu_ms_per_text(forward: Callable[[Batch], torch.Tensor], batches: list[Batch]) -> float:
    with torch.inference_mode():
        forward(batches[0])
        started = time.process_time()
        for batch in batches:
            forward(batch)
    return 1000 * (time.process_time() - started) / sum(len(b["input_ids"]) for b in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--texts", type=int, default=768)
    parser.add_argument("--model", choices=tuple(BUILDERS), default="minilm")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as tmp:
        path = BUILDERS[args.model](Path(tmp) / "classifier")
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
        padded = encoder_forward(model, "logits", tokenizer, "bench-padded", None, packed=False)
        served = encoder_forward(model, "logits", tokenizer, "bench-served", None)
        print(f"padded forward traced: {padded.traced}; served forward traced: {served.traced}, packs: {served.packed}")
        encoded = tokenizer(make_texts(args.texts))
        rows, types = encoded["input_ids"], encoded.get("token_type_ids")

        def batch(idx: list[int]) -> Batch:
            return pad_rows([rows[i] for i in idx], 0, [types[i] for i in idx] if types else None, torch.device("cpu"))

        shapes = {name: [batch(idx) for idx in batches] for name, batches in batch_shapes(rows).items()}
        times: dict[tuple[str, str], list[float]] = {}
        for r in range(args.rounds):
            for name, batches in shapes.items():
                ways = [("padded", padded), ("served", served)]
                for way, forward in ways if r % 2 == 0 else reversed(ways):
                    times.setdefault((name, way), []).append(cpu_ms_per_text(forward, batches))
    print(f"{'batches':<12} {'padded ms/text':>15} {'served ms/text':>15} {'padded/served':>14}")
    for name in shapes:
        pad, srv = (sorted(times[(name, way)])[len(times[(name, way)]) // 2] for way in ("padded", "served"))
        print(f"{name:<12} {pad:>15.2f} {srv:>15.2f} {pad / srv:>14.2f}")


if __name__ == "__main__":
    main()
