"""An encoder's forward pass as a TorchScript trace, used only where it matches eager.

A traced forward runs in C++ from start to end without holding Python's GIL, so the
event loop and other lanes keep running while it computes; the eager forward takes the
GIL back between every operation and stalls behind any Python work. Measured on 2 cores
(MiniLM, bench/README.md): one text 5.9 instead of 8.1 ms; at concurrency 64, 12 % more
throughput.

The trace is made at load time from a small synthetic batch and checked against the
eager model on batches of other shapes, padded and unpadded; any difference, or any
failure to trace (including a future torch without ``torch.jit``), leaves the model
eager. TorchScript keeps every trace's code until the process ends (about 20 MB for
MiniLM), so each catalog entry is traced once per process: unloading detaches the
trace from the weights, and a reload attaches the new weights to it and checks again.
"""

from __future__ import annotations

import logging
import threading
import warnings
from typing import Any

import torch

from app.runners.base import pad_rows

log = logging.getLogger(__name__)

# Token lengths of the batch traced, and of the batches it is checked on.
TRACE_LENGTHS = (9, 4)
CHECK_LENGTHS = ((16, 16, 16), (3,), (11, 2, 7, 5, 13))
TOLERANCE = 1e-4

# One trace per (entry, output, device, dtype) for the life of the process; see above.
_traces: dict[tuple[str, ...], Any] = {}
_traces_lock = threading.Lock()


class EncoderForward:
    """Calls the model on a padded batch and returns one output (``logits``, ``last_hidden_state``).

    Holds the model as ``model``, so that unloading a runner drops it with the weights.
    """

    def __init__(self, model: Any, output: str, traced: Any = None, keys: frozenset[str] = frozenset()) -> None:
        self.model = model
        self.output = output
        self._traced = traced
        self._keys = keys

    @property
    def traced(self) -> bool:
        return self._traced is not None

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self._traced is not None and batch.keys() == self._keys:
            result: torch.Tensor = self._traced(**batch)[self.output]
        else:
            result = getattr(self.model(**batch), self.output)
        return result

    def release(self) -> None:
        """Detach the kept trace from these weights, so that dropping the model frees them."""
        if self._traced is not None:
            _detach(self._traced)
            self._traced = None
        self.model = None


def encoder_forward(model: Any, output: str, tokenizer: Any, name: str, torchscript: bool | None) -> EncoderForward:
    """The model's forward pass, traced where a trace matches eager and ``torchscript`` asks
    for it (an entry's setting; None: on a CPU only)."""
    param = next(model.parameters())
    if not (torchscript if torchscript is not None else param.device.type == "cpu"):
        return EncoderForward(model, output)
    uses_types = "token_type_ids" in tokenizer.model_input_names
    key = (name, output, str(param.device), str(param.dtype), str(uses_types))
    with _traces_lock:
        kept = _traces.get(key)
        try:
            traced = _reuse(kept, model, output, uses_types) if kept is not None else _trace(model, output, uses_types)
        except Exception as exc:  # tracing is an optimisation; eager always works
            log.warning("model %s runs eager: tracing failed (%s: %s)", name, type(exc).__name__, exc)
            return EncoderForward(model, output)
        if traced is None:
            log.warning("model %s runs eager: its trace did not match the eager model", name)
            return EncoderForward(model, output)
        _traces[key] = traced
    log.info("model %s runs a TorchScript forward (checked against eager)", name)
    keys = {"input_ids", "attention_mask", *(["token_type_ids"] if uses_types else [])}
    return EncoderForward(model, output, traced, frozenset(keys))


def _trace(model: Any, output: str, uses_types: bool) -> Any:
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # deprecation and "might not generalise": the check decides
        traced = torch.jit.trace(
            model,
            example_kwarg_inputs=_synthetic(model, TRACE_LENGTHS, uses_types),
            strict=False,
            check_trace=False,
            _store_inputs=False,
        )
    return traced if _matches(traced, model, output, uses_types) else None


def _reuse(traced: Any, model: Any, output: str, uses_types: bool) -> Any:
    """The kept trace running ``model``'s weights, if their names and shapes line up and it matches."""
    ours = _tensors(traced)
    theirs = _tensors(model)
    if ours.keys() != theirs.keys() or any(ours[k].dtype != theirs[k].dtype for k in ours):
        return None
    with torch.no_grad():
        for name, tensor in ours.items():
            tensor.data = theirs[name].data
    if _matches(traced, model, output, uses_types):
        return traced
    _detach(traced)
    return None


def _matches(traced: Any, model: Any, output: str, uses_types: bool) -> bool:
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        for lengths in CHECK_LENGTHS:
            batch = _synthetic(model, lengths, uses_types)
            want = getattr(model(**batch), output).float()
            got = traced(**batch)[output].float()
            if want.shape != got.shape or not torch.allclose(want, got, atol=TOLERANCE, rtol=TOLERANCE):
                return False
    return True


def _tensors(module: Any) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _detach(traced: Any) -> None:
    with torch.no_grad():
        for tensor in _tensors(traced).values():
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)


def _synthetic(model: Any, lengths: tuple[int, ...], uses_types: bool) -> dict[str, torch.Tensor]:
    """A right-padded batch of random token ids with the given lengths."""
    generator = torch.Generator().manual_seed(sum(lengths))
    high = max(int(getattr(model.config, "vocab_size", 0) or 0), 2)
    rows = [torch.randint(1, high, (n,), generator=generator).tolist() for n in lengths]
    types = [[0] * n for n in lengths] if uses_types else None
    return pad_rows(rows, 0, types, next(model.parameters()).device)
