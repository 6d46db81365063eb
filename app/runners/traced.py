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
(app/runners/packed.py), traced and checked the same way; ``EncoderForward`` picks
between the two per batch by how much of it is padding.
"""

from __future__ import annotations

import logging
import threading
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from app.runners.base import pad_rows
from app.runners.packed import PackedEncoder, packable

log = logging.getLogger(__name__)

# Token lengths of the batch traced, and of the batches it is checked on.
TRACE_LENGTHS = (9, 4)
CHECK_LENGTHS = ((16, 16, 16), (3,), (11, 2, 7, 5, 13))
TOLERANCE = 1e-4

# Padded tokens over real ones above which a batch runs packed rather than padded.
PACK_ABOVE = 1.04

# torch's CPU attention kernel runs a multiple of 16 keys fast and each key past it slowly:
# 12 rows x 12 heads of 32 (MiniLM), 1 thread: 48 keys 0.87 ms, 53 keys 1.42 ms, 63 keys
# 2.58 ms, 64 keys 1.32 ms (heads of 64, bert-base: 48 0.87, 53 1.29, 63 2.02, 64 1.42;
# bench/attention_width.py prints the whole range).
# A packed batch, where only attention sees padding, is therefore widened to the next
# multiple of 16 unless it is at most WIDEN_PAST tokens past one.
WIDEN_PAST = 5

# One trace per (entry, kind, output, device, dtype) for the life of the process; see above.
_traces: dict[tuple[str, ...], Any] = {}
_traces_lock = threading.Lock()


class EncoderForward:
    """Calls the model on a padded batch and returns one output (``logits``, ``last_hidden_state``).

    Holds the model as ``model``, so that unloading a runner drops it with the weights. With
    a packed forward (app/runners/packed.py), a batch whose padding is over ``PACK_ABOVE``
    of its real tokens runs packed; a well-sorted batch runs padded, which skips packing's
    index work (about 2 % of a forward pass, measured on sorted batches of 16).
    """

    def __init__(
        self,
        model: Any,
        output: str,
        traced: Any = None,
        keys: frozenset[str] = frozenset(),
        packed: Any = None,
    ) -> None:
        self.model = model
        self.output = output
        self._traced = traced
        self._packed = packed
        self._keys = keys

    @property
    def traced(self) -> bool:
        return self._traced is not None

    @property
    def packed(self) -> bool:
        return self._packed is not None

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if batch.keys() == self._keys:
            mask = batch["attention_mask"]
            if self._packed is not None and mask.numel() > PACK_ABOVE * int(mask.sum()):
                return self._run_packed(batch)
            if self._traced is not None:
                return self._traced(**batch)[self.output]
        return getattr(self.model(**batch), self.output)

    def _run_packed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        width = batch["attention_mask"].shape[1]
        extra = attention_width(width) - width
        if extra:
            batch = {k: F.pad(v, (0, extra)) for k, v in batch.items()}  # masked out, like any padding
        output: torch.Tensor = self._packed(**batch)[self.output]
        return output[:, :width] if self.output == "last_hidden_state" else output

    def release(self) -> None:
        """Detach the kept traces from these weights, so that dropping the model frees them."""
        for kept in (self._traced, self._packed):
            if isinstance(kept, torch.jit.ScriptModule):
                _detach(kept)
        self._traced = self._packed = None
        self.model = None


def attention_width(width: int) -> int:
    """The width a packed batch of ``width`` tokens runs at (see ``WIDEN_PAST``)."""
    past = width % 16
    if past == 0 or (width > 16 and past <= WIDEN_PAST):
        return width
    return width + 16 - past


def encoder_forward(
    model: Any, output: str, tokenizer: Any, name: str, torchscript: bool | None, packed: bool | None = None
) -> EncoderForward:
    """The model's forward pass, traced where a trace matches eager and ``torchscript`` asks
    for it, with a packed forward for ragged batches where the architecture allows it, the
    result matches eager and ``packed`` asks for it (an entry's settings; None: on a CPU)."""
    param = next(model.parameters())
    on_cpu = param.device.type == "cpu"
    trace = torchscript if torchscript is not None else on_cpu
    pack = (packed if packed is not None else on_cpu) and packable(model, output)
    uses_types = "token_type_ids" in tokenizer.model_input_names
    keys = frozenset({"input_ids", "attention_mask", *(["token_type_ids"] if uses_types else [])})
    check = _Check(name, model, output, uses_types)
    traced = check.prepare("padded", model) if trace else None
    packer = check.prepare("packed", PackedEncoder(model, output), trace) if pack else None
    if traced is not None or packer is not None:
        ways = [w for w, f in (("a TorchScript forward", traced), ("packed batches", packer)) if f is not None]
        log.info("model %s runs %s (checked against eager)", name, " and ".join(ways))
    return EncoderForward(model, output, traced, keys, packer)


class _Check:
    """Makes a faster forward for one model and keeps it only where it matches eager."""

    def __init__(self, name: str, model: Any, output: str, uses_types: bool) -> None:
        self.name, self.model, self.output, self.uses_types = name, model, output, uses_types
        self._expected: list[tuple[dict[str, torch.Tensor], torch.Tensor]] | None = None

    def expected(self) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """The check batches and the eager model's output on each, computed once for every candidate."""
        if self._expected is None:
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore")
                batches = [_synthetic(self.model, lengths, self.uses_types) for lengths in CHECK_LENGTHS]
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
                example_kwarg_inputs=_synthetic(self.model, TRACE_LENGTHS, self.uses_types),
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
        _detach(traced)
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
