"""Iteration-level decoding for encoder-decoder models (Marian, BART, mBART, Pegasus, T5,
M2M100/NLLB):
one running batch whose sequences join and leave between decoder steps.

A request's input runs the encoder once, when it joins (with the others joining at that
step, in one forward pass that also computes its first token); its rows (one, or one per
beam) then keep their decoder cache inside the running batch. Each step feeds every
running row its last token; a sequence that finished leaves at once, and the next step
takes whoever waits. Rows that joined at different steps hold different numbers of
tokens: the self-attention cache is left-padded (masked) to the longest, the
cross-attention cache right-padded to the longest input, and each row's decoder position
is its own (app/runners/positions.py; T5's relative positions need none).

Token choice is ``generate``'s, per request, with its own settings (app/runners/search.py),
so outputs equal ``generate``'s on the same inputs, up to float noise of a different batch
composition. The cache layers this edits are guarded by tests/test_framework_internals.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from app.payloads import Generation, GenerationDelta
from app.runners.positions import RowPositions, row_positions
from app.runners.search import Beams, Plan, Search
from app.runners.tokens import pad_rows


@dataclass(eq=False)
class Generating:
    """One input's generation inside the running batch."""

    input_ids: list[int]
    truncated: bool
    decoding: Search | Beams
    streaming: bool
    sent: str = ""  # the text streamed so far
    sent_tokens: int = 0


@dataclass
class Progress:
    """What one step gave one input: new text (streaming inputs only), or its result."""

    sequence: Generating
    delta: GenerationDelta | None = None
    result: Generation | None = None


Decode = Callable[[Sequence[int]], str]


class RunningBatch:
    """The sequences being decoded on one model, and their tensors. One thread drives it."""

    def __init__(self, model: Any, pad_id: int, decode: Decode) -> None:
        self.model = model
        self.pad_id = pad_id
        self.decode = decode
        self.device = next(model.parameters()).device
        self.positions = row_positions(model)
        self.sequences: list[Generating] = []  # in row order: each holds .decoding.rows rows
        self.cache: EncoderDecoderCache | None = None
        self.self_mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self.input_mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self.next_position = torch.zeros(0, dtype=torch.long, device=self.device)
        hidden = model.config.d_model
        self._hidden = torch.zeros((1, 1, hidden), dtype=model.dtype, device=self.device)

    @property
    def rows(self) -> int:
        return int(self.self_mask.shape[0])

    @property
    def joins_mid_flight(self) -> bool:
        """Whether new sequences may join running ones (their decoder positions are ours to set)."""
        return self.positions is not False

    def start(self, plan_of: Plan, input_ids: list[int], truncated: bool, streaming: bool) -> Generating:
        """A new input's sequence, to pass to ``step`` as joining."""
        decoding: Search | Beams
        if plan_of.beams > 1:
            decoding = Beams(plan_of, self.device, self.model)
        else:
            decoding = Search(plan_of, self.device)
        return Generating(input_ids, truncated, decoding, streaming)

    def step(self, joining: Sequence[Generating]) -> list[Progress]:
        """One decoder step for every running sequence, and the first for ``joining`` (their
        encoder pass included); what each gave. Finished sequences have left the batch."""
        with torch.inference_mode():
            if self.sequences:
                self._advance(self._forward())
            if joining:
                self._join(list(joining))
        progress = [self._progress(s) for s in self.sequences]
        self.remove([p.sequence for p in progress if p.result is not None])
        return progress

    def remove(self, gone: Sequence[Generating]) -> None:
        """Take sequences out of the batch (finished, or their clients left)."""
        if not gone:
            return
        leaving = set(map(id, gone))
        keep: list[int] = []
        row = 0
        kept = []
        for s in self.sequences:
            if id(s) not in leaving:
                keep.extend(range(row, row + s.decoding.rows))
                kept.append(s)
            row += s.decoding.rows
        self.sequences = kept
        if not kept:
            self.cache = None
            self.self_mask = self.self_mask[:0, :0]
            self.input_mask = self.input_mask[:0, :0]
            self.next_position = self.next_position[:0]
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._select_rows(index)
        # Columns no row needs any more: the decoder's leading padding, the inputs' trailing.
        lead = int((self.self_mask.cumsum(dim=1) == 0).sum(dim=1).min())
        width = int(self.input_mask.sum(dim=1).max())
        self._slice_columns(lead, width)

    # -- tensors ---------------------------------------------------------------------------

    def _forward(self) -> torch.Tensor:
        """One decoder step over the running rows: their next-token logits (float32)."""
        assert self.cache is not None
        rows = self.rows
        last = torch.cat([s.decoding.last for s in self.sequences]).reshape(rows, 1)
        mask = torch.cat((self.self_mask, self.self_mask.new_ones((rows, 1))), dim=1)
        hidden = BaseModelOutput(last_hidden_state=self._hidden.expand(rows, self.input_mask.shape[1], -1))
        if isinstance(self.positions, RowPositions):
            self.positions.rows = self.next_position[:, None]
        try:
            out = self.model(
                encoder_outputs=hidden,
                attention_mask=self.input_mask,
                decoder_input_ids=last,
                decoder_attention_mask=mask,
                cache=self.cache,
                use_cache=True,
            )
        finally:
            if isinstance(self.positions, RowPositions):
                self.positions.rows = None
        self.self_mask = mask
        self.next_position = self.next_position + 1
        return out.logits[:, -1, :].to(dtype=torch.float32)

    def _advance(self, logits: torch.Tensor) -> None:
        """Each running sequence chooses its next tokens; beams' caches follow their parents."""
        index = _choose(self.sequences, logits)
        if index is not None:
            assert self.cache is not None
            _take_rows(_self_layers(self.cache), index)

    def _join(self, joining: list[Generating]) -> None:
        """The joining inputs' encoder pass and first decoder step, then their rows merged in."""
        batch = pad_rows([s.input_ids for s in joining], self.pad_id, None, self.device)
        encoder = self.model.get_encoder()(**batch, return_dict=True)
        # Beams start as copies of their input's encoding (the encoder ran once per input),
        # expanded before the first decoder step as generate expands them: the step's
        # numbers are then generate's, where a batch of other sizes could round differently.
        expand = torch.tensor([i for i, s in enumerate(joining) for _ in range(s.decoding.rows)], device=self.device)
        input_mask = batch["attention_mask"].index_select(0, expand)
        encoder = BaseModelOutput(last_hidden_state=encoder.last_hidden_state.index_select(0, expand))
        starts = torch.tensor([[s.decoding.plan.start] for s in joining for _ in range(s.decoding.rows)])
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        out = self.model(
            encoder_outputs=encoder,
            attention_mask=input_mask,
            decoder_input_ids=starts.to(self.device),
            cache=cache,
            use_cache=True,
        )
        index = _choose(joining, out.logits[:, -1, :].to(dtype=torch.float32))
        if index is not None:
            _take_rows(_self_layers(cache), index)
        self._merge(cache, input_mask, joining)

    def _merge(self, cache: EncoderDecoderCache, input_mask: torch.Tensor, joining: list[Generating]) -> None:
        rows = input_mask.shape[0]
        self_mask = input_mask.new_ones((rows, 1))
        next_position = torch.ones(rows, dtype=torch.long, device=self.device)
        if self.cache is None:
            self.cache, self.self_mask, self.input_mask, self.next_position = (
                cache,
                self_mask,
                input_mask,
                next_position,
            )
            self.sequences = joining
            return
        width = max(self.self_mask.shape[1], 1)
        inputs = max(self.input_mask.shape[1], input_mask.shape[1])
        for mine, theirs in zip(_self_layers(self.cache), _self_layers(cache), strict=True):
            mine.keys = torch.cat((_pad(mine.keys, 2, width), _pad(theirs.keys, 2, width)))
            mine.values = torch.cat((_pad(mine.values, 2, width), _pad(theirs.values, 2, width)))
        for mine, theirs in zip(_cross_layers(self.cache), _cross_layers(cache), strict=True):
            mine.keys = torch.cat((_pad(mine.keys, 2, inputs, right=True), _pad(theirs.keys, 2, inputs, right=True)))
            mine.values = torch.cat(
                (_pad(mine.values, 2, inputs, right=True), _pad(theirs.values, 2, inputs, right=True))
            )
        self.self_mask = torch.cat((_pad(self.self_mask, 1, width), _pad(self_mask, 1, width)))
        self.input_mask = torch.cat(
            (_pad(self.input_mask, 1, inputs, right=True), _pad(input_mask, 1, inputs, right=True))
        )
        self.next_position = torch.cat((self.next_position, next_position))
        self.sequences = [*self.sequences, *joining]

    def _select_rows(self, index: torch.Tensor) -> None:
        assert self.cache is not None
        _take_rows([*_self_layers(self.cache), *_cross_layers(self.cache)], index)
        self.self_mask = self.self_mask.index_select(0, index)
        self.input_mask = self.input_mask.index_select(0, index)
        self.next_position = self.next_position.index_select(0, index)

    def _slice_columns(self, lead: int, width: int) -> None:
        assert self.cache is not None
        if lead > 0:
            for layer in _self_layers(self.cache):
                layer.keys = layer.keys[:, :, lead:]
                layer.values = layer.values[:, :, lead:]
            self.self_mask = self.self_mask[:, lead:]
        if width < self.input_mask.shape[1]:
            for layer in _cross_layers(self.cache):
                layer.keys = layer.keys[:, :, :width]
                layer.values = layer.values[:, :, :width]
            self.input_mask = self.input_mask[:, :width]

    # -- text ------------------------------------------------------------------------------

    def _progress(self, s: Generating) -> Progress:
        decoding = s.decoding
        if decoding.done:
            best = decoding.best()
            text = self.decode(best.tolist()).strip()
            rest = None
            if s.streaming and len(text) > len(s.sent) and text.startswith(s.sent):  # the text not yet streamed
                rest = GenerationDelta(text[len(s.sent) :], int(best.numel()) - 1)
            return Progress(s, delta=rest, result=Generation(text, s.truncated))
        if not s.streaming:
            return Progress(s)
        settled = decoding.settled()
        if settled.numel() <= s.sent_tokens:
            return Progress(s)
        # Trailing spaces wait for the next word (the final text is stripped); a partial
        # character (a byte-level token's half) waits for its rest.
        text = self.decode(settled.tolist()).strip()
        if len(text) <= len(s.sent) or not text.startswith(s.sent) or text.endswith("\ufffd"):
            return Progress(s)
        delta = GenerationDelta(text[len(s.sent) :], int(settled.numel()))
        s.sent, s.sent_tokens = text, int(settled.numel())
        return Progress(s, delta=delta)


def _choose(sequences: Sequence[Generating], logits: torch.Tensor) -> torch.Tensor | None:
    """Each sequence's next tokens from its rows of ``logits`` (in row order); the row each
    row continues, where beam search moved any, else None."""
    order: list[torch.Tensor] = []
    moved = False
    row = 0
    for s in sequences:
        rows = s.decoding.rows
        parents = s.decoding.choose(logits[row : row + rows])
        moved = moved or parents is not None
        order.append(torch.arange(row, row + rows, device=logits.device) if parents is None else parents + row)
        row += rows
    return torch.cat(order) if moved else None


def _take_rows(layers: Sequence[Any], index: torch.Tensor) -> None:
    """Cache layers' rows ``index``, in that order."""
    for layer in layers:
        layer.keys = layer.keys.index_select(0, index)
        layer.values = layer.values.index_select(0, index)


def _self_layers(cache: EncoderDecoderCache) -> list[Any]:
    """The decoder self-attention cache's layers (DynamicLayer: ``keys``, ``values``)."""
    return list(cache.self_attention_cache.layers)


def _cross_layers(cache: EncoderDecoderCache) -> list[Any]:
    """The cross-attention cache's layers, one row per decoder row."""
    return list(cache.cross_attention_cache.layers)


def _pad(tensor: torch.Tensor, dim: int, size: int, right: bool = False) -> torch.Tensor:
    """``tensor`` padded with zeros along ``dim`` to ``size``: on the left (the decoder's
    cache and mask: its newest token stays last) or the right (the input's)."""
    missing = size - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    zeros = tensor.new_zeros(shape)
    return torch.cat((tensor, zeros) if right else (zeros, tensor), dim=dim)
