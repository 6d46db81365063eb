"""From texts to the tensors a model reads: token limits, tokenizing (truncating only what
is too long), padding rows into a batch. Shared by the runners and the forward checks."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

# A tokenizer whose model_max_length is unset reports this huge sentinel.
_UNSET_MAX = 1_000_000


def max_input_tokens(tokenizer: Any, config: Any, override: int | None) -> int:
    """The longest input the model accepts: the entry's override, else what tokenizer and config say."""
    limits = [override] if override else []
    if 0 < tokenizer.model_max_length < _UNSET_MAX:
        limits.append(tokenizer.model_max_length)
    positions = getattr(config, "max_position_embeddings", None)
    if positions:
        # RoBERTa-style models offset positions by the padding index.
        offset = (config.pad_token_id + 1) if config.model_type in {"roberta", "xlm-roberta"} else 0
        limits.append(positions - offset)
    return min(limits) if limits else 512


def encode_texts(
    tokenizer: Any, texts: Sequence[str], max_tokens: int, pairs: Sequence[str] | None = None
) -> list[tuple[list[int], list[int] | None, bool]]:
    """Tokenize, truncating only inputs over ``max_tokens``: (ids, token_type_ids, truncated)."""
    full = tokenizer(list(texts), list(pairs) if pairs is not None else None, verbose=False)
    out: list[tuple[list[int], list[int] | None, bool]] = []
    for i, ids in enumerate(full["input_ids"]):
        type_ids = full["token_type_ids"][i] if "token_type_ids" in full else None
        if len(ids) <= max_tokens:
            out.append((ids, type_ids, False))
            continue
        short = tokenizer(
            texts[i],
            pairs[i] if pairs is not None else None,
            truncation="only_first" if pairs is not None else True,
            max_length=max_tokens,
        )
        out.append((short["input_ids"], short.get("token_type_ids"), True))
    return out


def pad_rows(
    rows: Sequence[list[int]], pad_id: int, type_rows: Sequence[list[int]] | None, device: torch.device
) -> dict[str, torch.Tensor]:
    """Right-pad token rows into input_ids / attention_mask (/ token_type_ids) tensors.

    One numpy pass over all the tokens (a mask of the real positions, filled from the
    concatenated rows), not a tensor per row: 37 us for 16 rows where the per-row copy took
    355 us (bench/ceiling.py measures what that is worth per request)."""
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    width, total = int(lengths.max()), int(lengths.sum())
    real = np.arange(width) < lengths[:, None]
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    ids[real] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=total)
    batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(real.astype(np.int64))}
    if type_rows is not None:
        types = np.zeros((len(rows), width), dtype=np.int64)
        types[real] = np.fromiter(itertools.chain.from_iterable(type_rows), dtype=np.int64, count=total)
        batch["token_type_ids"] = torch.from_numpy(types)
    return {k: v.to(device) for k, v in batch.items()}


def pad_id_of(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else (tokenizer.eos_token_id or 0))
