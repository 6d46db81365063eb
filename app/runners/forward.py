"""Which forward pass an encoder model runs, chosen in one place: eager, a TorchScript trace,
or packed batches (app/runners/packed.py), each faster one kept only where it matches the
eager model at load (app/runners/traced.py); the width a packed batch runs at; and the
padding slack that pays for each, which the batcher forms batches with.

Each runner declares its forward (``Runner.forward``); the registry reads the runner's
``padding_slack`` when it starts the model's batcher.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from app.runners.packed import PackedEncoder, packable
from app.runners.traced import ForwardCheck, detach

log = logging.getLogger(__name__)

# How far past its shortest input a batch may stretch, in tokens, whatever the padding
# ratio says: padded tokens cost as much as real ones in a padded forward.
PADDING_SLACK = 4
# With a packed forward, padding costs only in attention; a wider slack lets short inputs
# form larger batches (in-process at c=64, 12 tokens: 3 % more texts/s than 4; 24 or no
# limit at all: less, as attention's padding grows).
PACKED_PADDING_SLACK = 12

# Padded tokens over real ones above which a batch runs packed rather than padded.
PACK_ABOVE = 1.04

# torch's CPU attention kernel runs a multiple of 16 keys fast and each key past it slowly:
# 12 rows x 12 heads of 32 (MiniLM), 1 thread: 48 keys 0.87 ms, 53 keys 1.42 ms, 63 keys
# 2.58 ms, 64 keys 1.32 ms (heads of 64, bert-base: 48 0.87, 53 1.29, 63 2.02, 64 1.42;
# bench/attention_width.py prints the whole range).
# A packed batch, where only attention sees padding, is therefore widened to the next
# multiple of 16 unless it is at most WIDEN_PAST tokens past one.
WIDEN_PAST = 5


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

    @property
    def padding_slack(self) -> int:
        """Tokens a batch may stretch past its shortest input (see PACKED_PADDING_SLACK)."""
        return PACKED_PADDING_SLACK if self.packed else PADDING_SLACK

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
                detach(kept)
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
    check = ForwardCheck(name, model, output, uses_types)
    traced = check.prepare("padded", model) if trace else None
    packer = check.prepare("packed", PackedEncoder(model, output), trace) if pack else None
    if traced is not None or packer is not None:
        ways = [w for w, f in (("a TorchScript forward", traced), ("packed batches", packer)) if f is not None]
        log.info("model %s runs %s (checked against eager)", name, " and ".join(ways))
    return EncoderForward(model, output, traced, keys, packer)
