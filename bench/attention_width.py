"""torch's CPU attention by key width: why packed batches widen to a multiple of 16.

    .venv/bin/python bench/attention_width.py [--rows 12] [--heads 12] [--head-size 32]

Times ``scaled_dot_product_attention`` on one torch thread for each width from 28 to 72
keys (a batch of ``--rows`` right-padded sequences, a quarter of them padded), and prints
each width's time next to the width ``app.runners.forward.attention_width`` runs it at.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from app.runners.forward import attention_width


def attention_ms(rows: int, heads: int, size: int, width: int) -> float:
    q, k, v = (torch.randn(rows, heads, width, size) for _ in range(3))
    keys = torch.ones(rows, width, dtype=torch.bool)
    keys[rows // 2 :, width * 3 // 4 :] = False
    mask = keys[:, None, None, :]
    runs = []
    with torch.inference_mode():
        for _ in range(5):
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            started = time.perf_counter()
            for _ in range(10):
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            runs.append((time.perf_counter() - started) * 100)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    times = {w: attention_ms(args.rows, args.heads, args.head_size, w) for w in range(28, 73)}
    print(f"{args.rows} rows x {args.heads} heads of {args.head_size}, one torch thread (ms per call)")
    print(f"{'width':>5} {'ms':>6} {'runs at':>8} {'ms':>6}")
    for width, ms in times.items():
        wide = attention_width(width)
        print(f"{width:>5} {ms:>6.2f} {wide:>8} {times[wide]:>6.2f}" if wide in times else f"{width:>5} {ms:>6.2f}")


if __name__ == "__main__":
    main()
