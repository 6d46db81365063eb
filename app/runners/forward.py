"""Which forward pass an encoder model runs, chosen in one place: eager, a TorchScript trace,
or packed batches (app/runners/packed.py), each faster one kept only where it matches the
eager model at load (app/runners/traced.py); and the padding slack the batcher forms
batches with (``Runner.padding_slack``).

A packed model's wider slack (12 tokens) and its batches widened to a multiple of 16 keys
were dropped in issue 24: re-measured side by side (bench/run.py, MiniLM, c=64, 5 rounds)
at 1.01x and 1.00x, inside the spread (docs/performance.md).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

import app.runners.onnx_runtime as onnx
from app.runners.packed import PackedEncoder, packable
from app.runners.traced import TOLERANCE, TRACE_LENGTHS, ForwardCheck, detach, synthetic_batch

log = logging.getLogger(__name__)

# How far past its shortest input a batch may stretch, in tokens, whatever the padding
# ratio says: padded tokens cost as much as real ones in a padded forward.
PADDING_SLACK = 4
# Padded tokens over real ones above which a batch runs packed rather than padded.
PACK_ABOVE = 1.04


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
        session: onnx.OnnxForward | None = None,
        note: str | None = None,
    ) -> None:
        self.model = model
        self.output = output
        self._traced = traced
        self._packed = packed
        self._session = session
        self._keys = keys
        self.note = note  # why the backend is not the one the entry asked for

    def memory_bytes(self) -> int:
        """Memory beside the model's own weights: ONNX Runtime's copies of them."""
        return self._session.memory_bytes() if self._session is not None else 0

    @property
    def backend(self) -> str:
        """torch, onnx or onnx-int8."""
        return self._session.kind if self._session is not None else "torch"

    @property
    def traced(self) -> bool:
        return self._traced is not None

    @property
    def packed(self) -> bool:
        return self._packed is not None

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if batch.keys() == self._keys:
            if self._session is not None:
                return self._session(**batch)[self.output]
            mask = batch["attention_mask"]
            if self._packed is not None and mask.numel() > PACK_ABOVE * int(mask.sum()):
                return self._run_packed(batch)
            if self._traced is not None:
                return self._traced(**batch)[self.output]
        return getattr(self.model(**batch), self.output)

    def _run_packed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        output: torch.Tensor = self._packed(**batch)[self.output]
        return output

    def release(self) -> None:
        """Detach the kept traces from these weights, so that dropping the model frees them."""
        for kept in (self._traced, self._packed):
            if isinstance(kept, torch.jit.ScriptModule):
                detach(kept)
        self._traced = self._packed = self._session = None
        self.model = None


def encoder_forward(
    model: Any,
    output: str,
    tokenizer: Any,
    name: str,
    torchscript: bool | None,
    packed: bool | None = None,
    *,
    backend: str | None = None,
    quantize: str | None = None,
    path: Path | None = None,
) -> EncoderForward:
    """The model's forward pass: on ONNX Runtime where ``backend`` asks for it
    (app/runners/onnx_runtime.py; the model loaded from ``path``) and the session matches eager;
    else torch, traced where a trace matches eager and ``torchscript`` asks for it, with a
    packed forward for ragged batches where the architecture allows it, the result matches
    eager and ``packed`` asks for it (an entry's settings; None: on a CPU)."""
    param = next(model.parameters())
    on_cpu = param.device.type == "cpu"
    uses_types = "token_type_ids" in tokenizer.model_input_names
    keys = frozenset({"input_ids", "attention_mask", *(["token_type_ids"] if uses_types else [])})
    check = ForwardCheck(name, model, output, uses_types)
    note = None
    if backend == "onnx":
        session, note = _onnx_session(model, output, tokenizer, uses_types, quantize, path, check, on_cpu)
        if session is not None:
            log.info("model %s runs on ONNX Runtime (%s, checked against eager)", name, session.kind)
            return EncoderForward(model, output, keys=keys, session=session, note=note)
        log.warning("model %s: %s", name, note)
    trace = torchscript if torchscript is not None else on_cpu
    pack = (packed if packed is not None else on_cpu) and packable(model, output)
    traced = check.prepare("padded", model) if trace else None
    packer = check.prepare("packed", PackedEncoder(model, output), trace) if pack else None
    if traced is not None or packer is not None:
        ways = [w for w, f in (("a TorchScript forward", traced), ("packed batches", packer)) if f is not None]
        log.info("model %s runs %s (checked against eager)", name, " and ".join(ways))
    return EncoderForward(model, output, traced, keys, packer, note=note)


def entry_forward(
    model: Any, output: str, tokenizer: Any, entry: Any, path: Path, packed: bool | None = None
) -> EncoderForward:
    """``encoder_forward`` as a catalog entry sets it up (name, torchscript, packed, backend,
    quantize), for the model loaded from ``path``; ``packed=False``: a runner whose output the
    packed forward cannot give."""
    return encoder_forward(
        model,
        output,
        tokenizer,
        entry.name,
        entry.torchscript,
        entry.packed if packed is None else packed,
        backend=entry.backend,
        quantize=entry.quantize,
        path=path,
    )


def _onnx_session(
    model: Any,
    output: str,
    tokenizer: Any,
    uses_types: bool,
    quantize: str | None,
    path: Path | None,
    check: ForwardCheck,
    on_cpu: bool,
) -> tuple[onnx.OnnxForward | None, str | None]:
    """A checked ONNX Runtime session for the model, or None and why not (then also the note
    for an int8 request refused while the float session serves)."""
    if not on_cpu or path is None:
        return None, "backend onnx runs on a CPU only; this model runs on torch"
    if not onnx.available():
        return None, "backend onnx needs onnxruntime and onnxscript (pip install 'tessera[onnx]'); running on torch"
    inputs = ["input_ids", "attention_mask", *(["token_type_ids"] if uses_types else [])]
    example = synthetic_batch(model, TRACE_LENGTHS, uses_types)
    try:
        session = onnx.build(model, path, output, inputs, example)
    except Exception as exc:  # an architecture the exporter cannot take: torch serves
        return None, f"ONNX export failed ({type(exc).__name__}: {str(exc)[:200]}); running on torch"
    if not check.matches(session):
        return None, f"ONNX Runtime's outputs differ from torch's beyond {TOLERANCE}; running on torch"
    if quantize != "int8":
        return session, None
    if not onnx.cpu_has_int8_dot_product():
        return session, "int8 refused: this CPU has no VNNI instructions, where int8 is no faster; running float32"
    try:
        quantized = onnx.quantized(session)
    except Exception as exc:
        return session, f"int8 quantization failed ({type(exc).__name__}: {exc}); running float32"
    lost = onnx.int8_keeps_quality(output, onnx.quality_batches(model, tokenizer, output, inputs), quantized)
    if lost is not None:
        return session, f"int8 refused: {lost}; running float32"
    return quantized, None
