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
from pathlib import Path
from typing import Any

import torch
from transformers import pipeline

from app.runners.forward import PADDING_SLACK, EncoderForward


@dataclass
class Encoded:
    """One input, tokenized: ``rows`` sequences of at most ``length`` tokens each."""

    rows_ids: list[list[int]]
    truncated: bool = False
    rows_type_ids: list[list[int]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Read many times while batches form: worked out once (rows_ids is never changed).
    rows: int = field(init=False)
    length: int = field(init=False)

    def __post_init__(self) -> None:
        self.rows = len(self.rows_ids)
        self.length = max(map(len, self.rows_ids), default=0)


class Runner(ABC):
    """A loaded model that the batcher drives; subclasses are one per task family."""

    model: Any  # a transformers PreTrainedModel
    # An encoder's forward pass (app/runners/forward.py), declared by each runner that has one.
    forward: EncoderForward | None = None
    # Whether padded input tokens cost little next to the rest of the work (generate's
    # decoding steps): then the batcher fills batches without regard to length spread.
    pads_cheaply = False
    # Lanes on a CPU unless TESSERA_LANES_PER_MODEL says otherwise (see app/batching/threads.py).
    cpu_lanes = 2
    # Whether it generates in steps, served by the continuous batcher (app/batching/continuous.py).
    steps = False

    def __init__(self) -> None:
        self.tokenizer_lock = threading.Lock()

    def encode(self, payloads: Sequence[Any]) -> list[Encoded]:
        with self.tokenizer_lock:
            return self.tokenize(payloads)

    @abstractmethod
    def tokenize(self, payloads: Sequence[Any]) -> list[Encoded]: ...

    def infer(self, payloads: Sequence[Any], encoded: Sequence[Encoded]) -> list[Any]:
        """One batch's results, in one pass (the dynamic batcher's runners). A runner that
        generates in ``steps`` has none: the continuous batcher drives its running batch."""
        raise NotImplementedError(f"{type(self).__name__} generates in steps")

    @property
    def backend(self) -> str:
        """What runs the forward pass: torch, onnx or onnx-int8."""
        return self.forward.backend if self.forward is not None else "torch"

    @property
    def backend_note(self) -> str | None:
        """Why the backend is not the one the entry asked for."""
        return self.forward.note if self.forward is not None else None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def memory_bytes(self) -> int:
        tensors = [*self.model.parameters(), *self.model.buffers()]
        extra = self.forward.memory_bytes() if self.forward is not None else 0
        return sum(t.numel() * t.element_size() for t in tensors) + extra

    @property
    def padding_slack(self) -> int:
        """Tokens a batch may stretch past its shortest input: what its forward makes pay."""
        return PADDING_SLACK

    def close(self) -> None:
        """Drop the weights (and whatever holds them) so that unloading really frees memory.

        Tokenizers stay: a request still splitting text when its model is unloaded finishes.
        """
        if self.forward is not None:
            self.forward.release()  # a kept trace outlives the runner; it must let go of the weights
        for attr, value in list(vars(self).items()):
            if isinstance(value, torch.nn.Module) or isinstance(getattr(value, "model", None), torch.nn.Module):
                setattr(self, attr, None)


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


def weights_kwargs(allow_pickle: bool) -> dict[str, Any]:
    """from_pretrained options for the safe default: safetensors only, no remote code."""
    return {"use_safetensors": None if allow_pickle else True, "trust_remote_code": False}


def load_pipeline(task: str, entry: Any, path: Path, device: torch.device, dtype: torch.dtype) -> Any:
    """A transformers pipeline over the entry's weights (safetensors only unless it allows
    pickle, never remote code): its model, tokenizer and post-processing."""
    make: Any = pipeline  # its overloads want a literal task name
    return make(
        task,
        model=str(path),
        device=device,
        dtype=dtype,
        trust_remote_code=False,
        model_kwargs={"use_safetensors": weights_kwargs(entry.allow_pickle)["use_safetensors"]},
    )
