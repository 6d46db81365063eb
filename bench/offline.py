"""The in-process baselines: the same model files, no HTTP, no batcher.

``batched`` is the best a well-batched offline loop does: tokenize everything at once,
sort by token length, pad and run fixed-size batches on one thread that uses all of
torch's threads; ``lanes`` runs the same sorted batches on several threads at once,
each on one torch thread, as the server's lanes do under load. ``sequential`` runs one
text at a time and times each, which is both the single-item latency and the naive
generate loop. All include tokenization and turning outputs into results (labels with
scores, decoded text), as the server does.

A classifier runs the forward pass the server runs: on a CPU, the same checked
TorchScript trace (app/runners/traced.py), so that served and offline differ only in
what the server adds. ``batched`` and ``sequential`` run on one dedicated worker
thread, which also makes the trace, so that it is the only thread with a torch thread
pool of its own (see app/batching/threads.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from load import Measurement, ms_per
from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification, AutoTokenizer

from app.runners.forward import encoder_forward


class OfflineModel:
    """A tokenizer and a model loaded from a model directory, and its ``predict`` step."""

    threads = torch.get_num_threads()  # torch threads of the worker thread; run.py sets it

    def __init__(self, path: Path, kind: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.kind = kind
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForSequenceClassification
        self.model = auto.from_pretrained(str(path), dtype=dtype).to(self.device).eval()
        self.generation: dict[str, Any] = {}
        self.generated_tokens: list[int] = []  # per generated row, to check the fixed length
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="offline")
        self.traced = False
        if kind != "seq2seq":
            self.forward = self._on_worker(
                lambda: encoder_forward(self.model, "logits", self.tokenizer, "bench-offline", None)
            )
            self.traced = self.forward.traced

    def _on_worker(self, run: Callable[[], Any]) -> Any:
        def on_all_threads() -> Any:
            torch.set_num_threads(self.threads)
            return run()

        return self._worker.submit(on_all_threads).result()

    @property
    def torch_threads(self) -> int:
        """torch's intra-op thread count as the worker thread sees it."""
        return self._worker.submit(torch.get_num_threads).result()

    def close(self) -> None:
        self._worker.shutdown()

    def _predict(self, encodings: list[dict[str, list[int]]]) -> list[Any]:
        batch = self.tokenizer.pad(encodings, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            if self.kind == "seq2seq":
                output = self.model.generate(**batch, **self.generation)
                pad = self.model.generation_config.pad_token_id
                # Row 0 of each output is the decoder start token; count what was generated.
                self.generated_tokens += (output[:, 1:] != pad).sum(dim=1).tolist()
                return self.tokenizer.batch_decode(output, skip_special_tokens=True)
            probs = self.forward(dict(batch)).float().softmax(dim=-1)
        scores, labels = probs.max(dim=-1)
        names = self.model.config.id2label
        pairs = zip(scores.tolist(), labels.tolist(), strict=True)
        return [{"label": names[label], "score": score} for score, label in pairs]

    def _encode(self, texts: list[str]) -> list[dict[str, list[int]]]:
        encoded = self.tokenizer(texts, truncation=True)
        keys = list(encoded.keys())
        return [{k: encoded[k][i] for k in keys} for i in range(len(texts))]

    def batched(self, texts: list[str], batch_size: int, method: str = "offline batched") -> Measurement:
        return self._on_worker(lambda: self._batched(texts, batch_size, method))

    def sequential(self, texts: list[str], method: str = "offline single-item") -> Measurement:
        return self._on_worker(lambda: self._sequential(texts, method))

    def lanes(self, texts: list[str], batch_size: int, lanes: int, method: str = "offline lanes") -> Measurement:
        """The sorted batches of ``batched``, run by ``lanes`` threads at once on one torch thread each."""
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(lanes, thread_name_prefix="offline-lane") as pool:
                started, cpu_started = time.perf_counter(), time.process_time()
                encodings = self._encode(texts)
                order = sorted(range(len(texts)), key=lambda i: len(encodings[i]["input_ids"]))
                chunks = [order[at : at + batch_size] for at in range(0, len(order), batch_size)]
                results: list[Any] = [None] * len(texts)
                predicted = pool.map(lambda chunk: self._predict([encodings[i] for i in chunk]), chunks)
                for chunk, answers in zip(chunks, predicted, strict=True):
                    for i, result in zip(chunk, answers, strict=True):
                        results[i] = result
                seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        finally:
            torch.set_num_threads(1)
        extra = {"batch_size": batch_size, "lanes": lanes, "cpu_ms_per_text": ms_per(cpu, len(texts))}
        return Measurement(method, len(texts), seconds, extra=extra)

    def _batched(self, texts: list[str], batch_size: int, method: str) -> Measurement:
        started, cpu_started = time.perf_counter(), time.process_time()
        encodings = self._encode(texts)
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i]["input_ids"]))
        results: list[Any] = [None] * len(texts)
        for at in range(0, len(order), batch_size):
            chunk = order[at : at + batch_size]
            for i, result in zip(chunk, self._predict([encodings[i] for i in chunk]), strict=True):
                results[i] = result
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        extra = {"batch_size": batch_size, "cpu_ms_per_text": ms_per(cpu, len(texts))}
        return Measurement(method, len(texts), seconds, extra=extra)

    def _sequential(self, texts: list[str], method: str) -> Measurement:
        latencies = []
        started, cpu_started = time.perf_counter(), time.process_time()
        for text in texts:
            item_started = time.perf_counter()
            self._predict(self._encode([text]))
            latencies.append(time.perf_counter() - item_started)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        extra = {"batch_size": 1, "cpu_ms_per_text": ms_per(cpu, len(texts))}
        return Measurement(method, len(texts), seconds, latencies, extra=extra)
