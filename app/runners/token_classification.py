"""Token classification (NER, part-of-speech ...): a label per token, grouped into entities
as transformers' TokenClassificationPipeline groups them, with character offsets into the
input as the client sent it.

The pipeline's own post-processing (its aggregation strategies, ignored labels, windows
joined over a long text) turns each input's logits into entities; tokenizing and the
forward pass are ours, so that the batcher's batches reach the model whole. A text longer
than the model's maximum is truncated, or with ``stride`` read in overlapping windows
whose entities are joined, as the pipeline does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers.pipelines.token_classification import AggregationStrategy

from app.catalog import TokenClassificationEntry
from app.payloads import Entities, TokenClassifyInput
from app.runners.base import Encoded, Runner, load_pipeline
from app.runners.forward import entry_forward
from app.runners.tokens import max_input_tokens, pad_id_of, pad_rows


class TokenClassificationRunner(Runner):
    def __init__(self, entry: TokenClassificationEntry, path: Path, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.pipe = load_pipeline("token-classification", entry, path, device, dtype)
        self.model = self.pipe.model.eval()
        self.tokenizer: Any = self.pipe.tokenizer
        if not self.tokenizer.is_fast:
            raise RuntimeError("token classification needs a fast (Rust) tokenizer for character offsets")
        self.forward = entry_forward(self.model, "logits", self.tokenizer, entry, path, packed=False)
        self.max_tokens = max_input_tokens(self.tokenizer, self.model.config, entry.max_input_tokens)
        self.pad_id = pad_id_of(self.tokenizer)

    def tokenize(self, payloads: Sequence[TokenClassifyInput]) -> list[Encoded]:
        return [self._windows(p) for p in payloads]

    def _windows(self, payload: TokenClassifyInput) -> Encoded:
        """The text's tokens, in one window (the rest cut) or, with a stride, in as many as it takes."""
        # A stride at or past a window's own tokens would never move on: capped to one short of them.
        stride = min(payload.stride or 0, self.max_tokens - self.tokenizer.num_special_tokens_to_add() - 1)
        windows = self.tokenizer(
            payload.text,
            truncation=True,
            max_length=self.max_tokens,
            stride=stride,
            return_overflowing_tokens=True,
            return_special_tokens_mask=True,
            return_offsets_mapping=True,
        )
        count = len(windows["input_ids"]) if payload.stride is not None else 1
        types = windows.get("token_type_ids")
        return Encoded(
            windows["input_ids"][:count],
            truncated=len(windows["input_ids"]) > count,
            rows_type_ids=types[:count] if types is not None else None,
            extra={"offsets": windows["offset_mapping"][:count], "special": windows["special_tokens_mask"][:count]},
        )

    def infer(self, payloads: Sequence[TokenClassifyInput], encoded: Sequence[Encoded]) -> list[Entities]:
        rows = [ids for enc in encoded for ids in enc.rows_ids]
        types = [t for enc in encoded for t in (enc.rows_type_ids or [])]
        batch = pad_rows(rows, self.pad_id, types if len(types) == len(rows) else None, self.device)
        forward = self.forward
        assert forward is not None
        with torch.inference_mode():
            logits = forward(batch).float().cpu()
        results, row = [], 0
        with self.tokenizer_lock:  # the pipeline names tokens and words with the tokenizer
            for payload, enc in zip(payloads, encoded, strict=True):
                windows = [
                    {
                        "logits": logits[row + w : row + w + 1, : len(ids)],
                        "input_ids": torch.tensor([ids]),
                        "offset_mapping": torch.tensor([enc.extra["offsets"][w]]),
                        "special_tokens_mask": torch.tensor([enc.extra["special"][w]]),
                        "sentence": payload.text,
                    }
                    for w, ids in enumerate(enc.rows_ids)
                ]
                row += enc.rows
                found = self.pipe.postprocess(
                    windows,
                    aggregation_strategy=AggregationStrategy[payload.aggregation_strategy.upper()],
                    ignore_labels=list(payload.ignore_labels),
                )
                results.append(Entities([_plain(entity) for entity in found], enc.truncated))
        return results


def _plain(entity: dict[str, Any]) -> dict[str, Any]:
    """An entity with Python numbers (the pipeline's scores are numpy floats)."""
    return {key: value.item() if hasattr(value, "item") else value for key, value in entity.items()}
