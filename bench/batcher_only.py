"""The batcher without HTTP, next to the offline limit: what batching alone costs.

    .venv/bin/python bench/batcher_only.py [--concurrency 64] [--texts 1536]

The served runner and ``DynamicBatcher`` (two lanes and the padding slack, as the server
sets them on a CPU) are driven in this process by ``--concurrency`` asyncio tasks, one
text per request, over the classification scenario's texts; the offline limit runs the
same texts as in ``run.py``. The ratio separates the cost of batching only the texts in
flight from the cost of HTTP, which ``run.py``'s served figure adds on top.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from offline import OfflineModel
from workloads import build_minilm_classifier, make_texts

from app.batching.batcher import DynamicBatcher
from app.batching.running import BatchRecord
from app.batching.threads import ThreadShare
from app.catalog import TextClassificationEntry
from app.payloads import ClassifyInput
from app.runners.classification import ClassificationRunner


async def drive(batcher: DynamicBatcher, texts: list[str], concurrency: int) -> tuple[float, float]:
    """Texts per second and process CPU ms per text, ``concurrency`` requests in flight."""
    pending = iter(texts)

    async def client() -> None:
        loop = asyncio.get_running_loop()
        for text in pending:  # one request of one text, enqueued as the engine does (app/engine/core.py)
            future = loop.create_future()
            batcher.enqueue([ClassifyInput(text)], [future], loop=loop, deadline=time.monotonic() + 600)
            await future

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    return len(texts) / seconds, 1000 * (time.process_time() - cpu) / len(texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--texts", type=int, default=1536)
    args = parser.parse_args()
    OfflineModel.threads = budget = torch.get_num_threads()
    torch.set_num_threads(1)  # one OpenMP pool per process (app/batching/threads.py)
    texts = make_texts(args.texts)
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as tmp:
        path = build_minilm_classifier(Path(tmp) / "classifier")
        share = ThreadShare(budget, torch.set_num_threads)
        entry = TextClassificationEntry(name="bench-clf", task="text-classification", source={"path": str(path)})
        with share.running(may_lead=False):
            runner = ClassificationRunner(entry, path, torch.device("cpu"), torch.float32)
        records: list[BatchRecord] = []
        batcher = DynamicBatcher(
            runner, name="bench-clf", max_batch_size=32, max_batch_tokens=16384, max_queue_items=4096,
            lanes=2, threads=share, observer=records.append,
            padding_slack=runner.padding_slack,
        )  # fmt: skip
        asyncio.run(drive(batcher, texts[:256], args.concurrency))  # warm-up
        records.clear()
        batched, batched_cpu = asyncio.run(drive(batcher, texts, args.concurrency))
        batcher.close()
        offline = OfflineModel(path, "classification")
        offline.batched(texts[:128], 32)
        limit = max(offline.batched(texts, 32).throughput, offline.lanes(texts, 16, 2).throughput)
        offline.close()
    print(f"batcher in-process, c={args.concurrency}: {batched:.1f} texts/s ({batched_cpu:.2f} ms CPU per text)")
    size = sum(r.size for r in records) / len(records)
    padding = sum(r.padded_tokens for r in records) / sum(r.tokens for r in records)
    print(f"  mean batch {size:.1f} texts; padded / input tokens {padding:.2f} (packed: {runner.packs_batches})")
    print(f"offline limit: {limit:.1f} texts/s")
    print(f"batcher / offline: {batched / limit:.3f}")


if __name__ == "__main__":
    main()
