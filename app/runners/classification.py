"""Text classification and NLI zero-shot classification, through transformers' pipelines.

The pipelines load the model and turn logits into labelled scores exactly as
transformers does (``function_to_apply``, the entailment label); the forward pass is
ours, so that the batcher's length-sorted batches reach the model unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.catalog import TextClassificationEntry, ZeroShotEntry
from app.payloads import Classification, ClassifyInput, ZeroShotInput
from app.runners.base import Encoded, Runner, load_pipeline
from app.runners.forward import entry_forward
from app.runners.tokens import TextEncoder, pad_rows


class ClassificationRunner(Runner):
    """A sequence classifier (SST-2 sentiment, topic, toxicity ...)."""

    def __init__(self, entry: TextClassificationEntry, path: Path, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.pipe = load_pipeline("text-classification", entry, path, device, dtype)
        self.model = self.pipe.model.eval()
        self.tokenizer = self.pipe.tokenizer
        self.forward = entry_forward(self.model, "logits", self.tokenizer, entry, path)
        self.default_function = entry.function_to_apply or default_function(self.model.config)
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        self.text = TextEncoder.for_model(self.tokenizer, self.model.config, entry.max_input_tokens)

    def tokenize(self, payloads: Sequence[ClassifyInput]) -> list[Encoded]:
        encoded = self.text.encode([p.text for p in payloads])
        return [Encoded([ids], truncated, [types] if types else None) for ids, types, truncated in encoded]

    def infer(self, payloads: Sequence[ClassifyInput], encoded: Sequence[Encoded]) -> list[Classification]:
        logits = _forward(self, encoded).numpy()
        functions = [p.function_to_apply or self.default_function for p in payloads]
        scores = np.empty_like(logits)
        for function in set(functions):  # one numpy pass per function over the whole batch
            rows = [i for i, f in enumerate(functions) if f == function]
            scores[rows] = SCORE[function](logits[rows])
        # Best first; equal scores keep label order (as the pipeline's stable sort does).
        order = np.argsort(-scores, axis=-1, kind="stable").tolist()
        values = scores.tolist()
        results = []
        for payload, enc, ranked, row in zip(payloads, encoded, order, values, strict=True):
            top = ranked[: payload.top_k] if payload.top_k else ranked
            results.append(Classification([{"label": self.labels[j], "score": row[j]} for j in top], enc.truncated))
        return results


class NliZeroShotRunner(Runner):
    """Zero-shot classification with an NLI cross-encoder: one (text, hypothesis) row per label."""

    def __init__(self, entry: ZeroShotEntry, path: Path, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.pipe = load_pipeline("zero-shot-classification", entry, path, device, dtype)
        self.model = self.pipe.model.eval()
        self.tokenizer = self.pipe.tokenizer
        self.forward = entry_forward(self.model, "logits", self.tokenizer, entry, path)
        if self.pipe.entailment_id == -1:
            raise RuntimeError(
                "this model has no 'entailment' label in its config; the NLI zero-shot engine needs one "
                "(use engine: similarity for an embedding model)"
            )
        self.text = TextEncoder.for_model(self.tokenizer, self.model.config, entry.max_input_tokens)

    def tokenize(self, payloads: Sequence[ZeroShotInput]) -> list[Encoded]:
        out = []
        for p in payloads:
            rows = self.text.encode([p.text] * len(p.hypotheses), p.hypotheses)
            type_rows = [types for _, types, _ in rows]
            out.append(
                Encoded(
                    [ids for ids, _, _ in rows],
                    any(truncated for _, _, truncated in rows),
                    type_rows if all(t is not None for t in type_rows) else None,  # type: ignore[arg-type]
                )
            )
        return out

    def infer(self, payloads: Sequence[ZeroShotInput], encoded: Sequence[Encoded]) -> list[Classification]:
        logits = _forward(self, encoded)
        results, row = [], 0
        for payload, enc in zip(payloads, encoded, strict=True):
            outputs = [
                {"candidate_label": label, "sequence": payload.text, "logits": logits[row + j : row + j + 1]}
                for j, label in enumerate(payload.labels)
            ]
            row += enc.rows
            answer = self.pipe.postprocess(outputs, multi_label=payload.multi_label)
            ranked = [{"label": lb, "score": s} for lb, s in zip(answer["labels"], answer["scores"], strict=True)]
            results.append(Classification(ranked, enc.truncated))
        return results


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


# transformers' text-classification pipeline's functions, on every row at once.
SCORE = {
    "softmax": _softmax,
    "sigmoid": lambda logits: 1.0 / (1.0 + np.exp(-logits)),
    "none": lambda logits: logits,
}


def default_function(config: Any) -> str:
    """The pipeline's choice when neither the request nor the catalog names a function."""
    if config.problem_type == "regression":
        return "none"
    if config.problem_type == "multi_label_classification" or config.num_labels == 1:
        return "sigmoid"
    if config.problem_type == "single_label_classification" or config.num_labels > 1:
        return "softmax"
    return str(getattr(config, "function_to_apply", None) or "none")


def _forward(runner: ClassificationRunner | NliZeroShotRunner, encoded: Sequence[Encoded]) -> torch.Tensor:
    rows = [ids for enc in encoded for ids in enc.rows_ids]
    types = [t for enc in encoded for t in (enc.rows_type_ids or [])]
    batch = pad_rows(rows, runner.text.pad_id, types if len(types) == len(rows) else None, runner.device)
    forward = runner.forward
    assert forward is not None  # both runners declare theirs
    with torch.inference_mode():
        return forward(batch).float().cpu()
