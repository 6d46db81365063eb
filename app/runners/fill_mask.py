"""Fill-mask: the likeliest tokens for each mask token of a text (BERT-style masked language
models), scored and worded as transformers' fill-mask pipeline does.

The forward pass is the encoder's (app/runners/forward.py: traced where it matches eager);
the pipeline turns each input's logits at its mask positions into candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from app.catalog import FillMaskEntry
from app.errors import InputTooLarge, WrongTask
from app.payloads import FillMaskInput, MaskFills
from app.runners.base import Encoded, Runner, load_pipeline
from app.runners.forward import entry_forward
from app.runners.tokens import TextEncoder, pad_rows


class FillMaskRunner(Runner):
    def __init__(self, entry: FillMaskEntry, path: Path, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.pipe = load_pipeline("fill-mask", entry, path, device, dtype)
        self.model = self.pipe.model.eval()
        self.tokenizer: Any = self.pipe.tokenizer
        if self.tokenizer.mask_token_id is None:
            raise RuntimeError("this model's tokenizer has no mask token; fill-mask needs one")
        self.forward = entry_forward(self.model, "logits", self.tokenizer, entry, path, packed=False)
        self.text = TextEncoder.for_model(self.tokenizer, self.model.config, entry.max_input_tokens)

    def tokenize(self, payloads: Sequence[FillMaskInput]) -> list[Encoded]:
        # A text without this model's mask token is valid text this model cannot fill: a 400
        # (the route's other models may have another token), naming the token to use.
        mask = self.tokenizer.mask_token
        for payload in payloads:
            if mask not in payload.text:
                raise WrongTask(f"the text holds no mask token; put {mask} where a word should be predicted")
        encoded = self.text.encode([p.text for p in payloads])
        out = [Encoded([ids], truncated, [types] if types else None) for ids, types, truncated in encoded]
        if any(self.tokenizer.mask_token_id not in enc.rows_ids[0] for enc in out):
            raise InputTooLarge(f"its mask token {mask} is past the model's maximum length; shorten the text")
        return out

    def infer(self, payloads: Sequence[FillMaskInput], encoded: Sequence[Encoded]) -> list[MaskFills]:
        rows = [enc.rows_ids[0] for enc in encoded]
        types = [t for enc in encoded for t in (enc.rows_type_ids or [])]
        batch = pad_rows(rows, self.text.pad_id, types if len(types) == len(rows) else None, self.device)
        forward = self.forward
        assert forward is not None
        with torch.inference_mode():
            logits = forward(batch).float().cpu()
        results = []
        with self.tokenizer_lock:  # the pipeline decodes the candidates with the tokenizer
            for i, (payload, ids) in enumerate(zip(payloads, rows, strict=True)):
                outputs = {"input_ids": torch.tensor([ids]), "logits": logits[i : i + 1, : len(ids)]}
                targets = self.pipe.get_target_ids(list(payload.targets)) if payload.targets else None
                answer = self.pipe.postprocess(outputs, top_k=payload.top_k, target_ids=targets)
                masks = answer if answer and isinstance(answer[0], list) else [answer]
                results.append(MaskFills(masks, encoded[i].truncated))
        return results
