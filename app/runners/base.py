"""What every runner shares: tokenized inputs, padding, device and dtype choice.

A runner owns one loaded model. The batcher calls ``encode`` (tokenize) and ``infer``
(one forward pass over a formed batch) from its lanes, several threads at once; a
runner never sees HTTP and never runs on the event loop. Forward passes may overlap, but
the tokenizer is used by one thread at a time: ``encode`` holds ``tokenizer_lock``, and
so must any use of the tokenizer inside ``infer`` (decoding, say).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from app.heap import collect_all

if TYPE_CHECKING:
    from app.runners.traced import EncoderForward

# A tokenizer whose model_max_length is unset reports this huge sentinel.
_UNSET_MAX = 1_000_000


@dataclass
class Encoded:
    """One input, tokenized: ``rows`` sequences of at most ``length`` tokens each."""

    rows_ids: list[list[int]]
    truncated: bool = False
    rows_type_ids: list[list[int]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.rows_ids)

    @property
    def length(self) -> int:
        return max((len(ids) for ids in self.rows_ids), default=0)


class Runner(ABC):
    """A loaded model that the batcher drives; subclasses are one per task family."""

    model: Any  # a transformers PreTrainedModel
    # Whether padded input tokens cost little next to the rest of the work (generate's
    # decoding steps): then the batcher fills batches without regard to length spread.
    pads_cheaply = False
    # Lanes on a CPU unless TESSERA_LANES_PER_MODEL says otherwise (see app/batching/threads.py).
    cpu_lanes = 2

    def __init__(self) -> None:
        self.tokenizer_lock = threading.Lock()

    def encode(self, payloads: Sequence[Any]) -> list[Encoded]:
        with self.tokenizer_lock:
            return self.tokenize(payloads)

    @abstractmethod
    def tokenize(self, payloads: Sequence[Any]) -> list[Encoded]: ...

    @abstractmethod
    def infer(self, payloads: Sequence[Any], encoded: Sequence[Encoded]) -> list[Any]: ...

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def memory_bytes(self) -> int:
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def packs_batches(self) -> bool:
        """Whether its forward runs ragged batches packed (app/runners/packed.py): then padding
        costs little outside attention, and the batcher may stretch a batch further."""
        forwards = self._encoder_forwards()
        return bool(forwards) and all(forward.packed for forward in forwards)

    def _encoder_forwards(self) -> list[EncoderForward]:
        """The EncoderForwards it holds, directly or through its encoder."""
        from app.runners.traced import EncoderForward  # it imports this module

        held = [v for value in vars(self).values() for v in (value, getattr(value, "forward", None))]
        return [v for v in held if isinstance(v, EncoderForward)]

    def close(self) -> None:
        """Drop the weights (and whatever holds them) so that unloading really frees memory.

        Tokenizers stay: a request still splitting text when its model is unloaded finishes.
        """
        device = self.device
        for forward in self._encoder_forwards():
            forward.release()  # a kept trace outlives the runner; it must let go of the weights
        for attr, value in list(vars(self).items()):
            if isinstance(value, torch.nn.Module) or isinstance(getattr(value, "model", None), torch.nn.Module):
                setattr(self, attr, None)
        collect_all()  # frozen objects too (app/heap.py): a model's cycles must go with it
        if device.type == "cuda":
            torch.cuda.empty_cache()


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device '{spec}' was asked for but this machine has no CUDA GPU")
    if spec == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device 'mps' was asked for but this machine has no MPS device")
    return torch.device(spec)


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec != "auto":
        dtype: torch.dtype = getattr(torch, spec)
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


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
    """Right-pad token rows into input_ids / attention_mask (/ token_type_ids) tensors."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if type_rows is not None:
        types = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(type_rows):
            types[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        batch["token_type_ids"] = types
    return {k: v.to(device) for k, v in batch.items()}


def pad_id_of(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else (tokenizer.eos_token_id or 0))


def weights_kwargs(allow_pickle: bool) -> dict[str, Any]:
    """from_pretrained options for the safe default: safetensors only, no remote code."""
    return {"use_safetensors": None if allow_pickle else True, "trust_remote_code": False}
