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

Where the architecture allows, a second forward runs packed batches
(app/runners/packed.py), traced and checked the same way; app/runners/forward.py chooses
between them.
"""

from __future__ import annotations

import logging
import threading
import warnings
from typing import Any

import torch

from app.runners.tokens import pad_rows

log = logging.getLogger(__name__)

# Token lengths of the batch traced, and of the batches it is checked on.
TRACE_LENGTHS = (9, 4)
CHECK_LENGTHS = ((16, 16, 16), (3,), (11, 2, 7, 5, 13))
TOLERANCE = 1e-4

# One trace per (entry, kind, output, device, dtype) for the life of the process; see above.
_traces: dict[tuple[str, ...], Any] = {}
_traces_lock = threading.Lock()


class ForwardCheck:
    """Makes a faster forward for one model and keeps it only where it matches eager."""

    def __init__(self, name: str, model: Any, output: str, uses_types: bool) -> None:
        self.name, self.model, self.output, self.uses_types = name, model, output, uses_types
        self._expected: list[tuple[dict[str, torch.Tensor], torch.Tensor]] | None = None

    def expected(self) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """The check batches and the eager model's output on each, computed once for every candidate."""
        if self._expected is None:
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore")
                batches = [synthetic_batch(self.model, lengths, self.uses_types) for lengths in CHECK_LENGTHS]
                self._expected = [(batch, self.model(**batch)[self.output].float()) for batch in batches]
        return self._expected

    def prepare(self, kind: str, module: Any, trace: bool = True) -> Any:
        """``module`` (the model, or a wrapper of it), traced if ``trace``; None unless it matches eager."""
        if not trace:
            if self.matches(module):
                return module
            log.warning("model %s: its %s forward did not match the eager model", self.name, kind)
            return None
        param = next(self.model.parameters())
        key = (self.name, kind, self.output, str(param.device), str(param.dtype), str(self.uses_types))
        with _traces_lock:
            kept = _traces.get(key)
            try:
                traced = self.reuse(kept, module) if kept is not None else self.trace(module)
            except Exception as exc:  # tracing is an optimisation; eager always works
                log.warning(
                    "model %s: tracing its %s forward failed (%s: %s)", self.name, kind, type(exc).__name__, exc
                )
                return None
            if traced is None:
                log.warning("model %s: its traced %s forward did not match the eager model", self.name, kind)
                return None
            _traces[key] = traced
        return traced

    def trace(self, module: Any) -> Any:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # deprecation and "might not generalise": the check decides
            traced = torch.jit.trace(
                module,
                example_kwarg_inputs=synthetic_batch(self.model, TRACE_LENGTHS, self.uses_types),
                strict=False,
                check_trace=False,
                _store_inputs=False,
            )
        return traced if self.matches(traced) else None

    def reuse(self, traced: Any, module: Any) -> Any:
        """The kept trace running ``module``'s weights, if their names and shapes line up and it matches."""
        ours = _tensors(traced)
        theirs = _tensors(module)
        if ours.keys() != theirs.keys() or any(ours[k].dtype != theirs[k].dtype for k in ours):
            return None
        with torch.no_grad():
            for name, tensor in ours.items():
                tensor.data = theirs[name].data
        if self.matches(traced):
            return traced
        detach(traced)
        return None

    def matches(self, candidate: Any) -> bool:
        """Equal to the eager model on other shapes, padded and not; padded positions of a
        hidden state are compared only where a pooling reads them (real tokens)."""
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            for batch, want in self.expected():
                got = candidate(**batch)[self.output].float()
                if want.shape != got.shape:
                    return False
                if self.output == "last_hidden_state":
                    real = batch["attention_mask"].unsqueeze(-1).float()
                    want, got = want * real, got * real
                if not torch.allclose(want, got, atol=TOLERANCE, rtol=TOLERANCE):
                    return False
        return True


def _tensors(module: Any) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def detach(traced: Any) -> None:
    """Point a kept trace's tensors at nothing, so that it holds no model's weights."""
    with torch.no_grad():
        for tensor in _tensors(traced).values():
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)


def synthetic_batch(model: Any, lengths: tuple[int, ...], uses_types: bool) -> dict[str, torch.Tensor]:
    """A right-padded batch of random token ids with the given lengths."""
    generator = torch.Generator().manual_seed(sum(lengths))
    high = max(int(getattr(model.config, "vocab_size", 0) or 0), 2)
    rows = [torch.randint(1, high, (n,), generator=generator).tolist() for n in lengths]
    types = [[0] * n for n in lengths] if uses_types else None
    return pad_rows(rows, 0, types, next(model.parameters()).device)
