"""Iteration-level decoding for encoder-decoder models (Marian, BART, mBART, Pegasus, T5):
one running batch whose sequences join and leave between decoder steps.

A request's input runs the encoder once, when it joins (with the others joining at that
step, in one forward pass that also computes its first token); its rows (one, or one per
beam) then keep their decoder cache inside the running batch. Each step feeds every
running row its last token; a sequence that finished leaves at once, and the next step
takes whoever waits. Rows that joined at different steps hold different numbers of
tokens: the self-attention cache is left-padded (masked) to the longest, the
cross-attention cache right-padded to the longest input, and each row's decoder position
is its own (``RowPositions``; T5's relative positions need none).

Token choice is ``generate``'s, per request, with its own settings: the generation config,
logits processors and stopping criteria are the ones ``generate`` builds for the same
settings (``Plan``), and beam search runs generate's own selection steps per request
(``Beams``), so outputs equal ``generate``'s on the same inputs, up to float noise of a
different batch composition. The few transformers internals this needs are pinned in
pyproject.toml and guarded by tests/test_framework_internals.py.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from app.errors import InvalidInput
from app.payloads import Generation, GenerationDelta
from app.runners.tokens import pad_rows

# Model types whose decoder positions are relative (no position of a row's own is needed).
RELATIVE_POSITIONS = frozenset({"t5", "mt5", "umt5", "longt5", "switch_transformers"})
# Settings whose logits processors read the request's own input: planned per input.
PER_INPUT_SETTINGS = ("encoder_no_repeat_ngram_size", "encoder_repetition_penalty")


class RowPositions(torch.nn.Module):
    """Wraps a decoder's positional embedding so that each row of the running batch is
    embedded at its own position (``rows``, shape [rows, 1]); with ``rows`` unset it is the
    wrapped module, unchanged. Two kinds: a table looked up by position (BART, Marian, mBART,
    Pegasus; BART's and mBART's shifted by ``offset``), and M2M100's and NLLB's sinusoids,
    which count positions from past the padding index."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner
        self.rows: torch.Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.rows is None:
            return self.inner(*args, **kwargs)
        inner: Any = self.inner
        if isinstance(inner, torch.nn.Embedding):
            return torch.nn.functional.embedding(self.rows + int(getattr(inner, "offset", 0)), inner.weight)
        positions = self.rows + inner.padding_idx + 1
        fed = args[0] if args else kwargs.get("input_ids")
        if fed is not None:  # a padding token fed back (generated) sits at the padding index, as there
            positions = torch.where(fed.ne(inner.padding_idx), positions, inner.padding_idx)
        needed = int(positions.max()) + 1
        if needed > inner.weights.shape[0]:  # as its own forward grows the table
            inner.make_weights(needed + inner.offset, inner.embedding_dim, inner.padding_idx)
        return inner.weights.index_select(0, positions.reshape(-1)).reshape(*positions.shape, -1).detach()

    @staticmethod
    def fits(embed: Any) -> bool:
        """Whether ``embed`` is a kind this wraps."""
        if isinstance(embed, torch.nn.Embedding):
            return "position_ids" in inspect.signature(embed.forward).parameters
        return all(hasattr(embed, name) for name in ("weights", "padding_idx", "make_weights", "offset")) and hasattr(
            embed, "create_position_ids_from_input_ids"
        )


def row_positions(model: Any) -> RowPositions | bool | None:
    """Installs RowPositions on the model's decoder where its positions are absolute and of
    a kind it knows; None where they are relative (T5), False where neither holds (rows then
    join only an empty batch)."""
    if model.config.model_type in RELATIVE_POSITIONS:
        return None
    decoder = model.get_decoder()
    embed = getattr(decoder, "embed_positions", None)
    if isinstance(embed, RowPositions):
        return embed
    if not RowPositions.fits(embed):
        return False
    wrapped = RowPositions(embed)
    decoder.embed_positions = wrapped
    return wrapped


@dataclass
class Plan:
    """One set of generation settings, prepared as ``generate`` prepares them."""

    config: GenerationConfig
    processors: Any  # a LogitsProcessorList: (ids, scores) -> scores
    stopping: Any  # a StoppingCriteriaList: (ids, scores) -> done per row
    start: int  # the decoder's start token

    @property
    def beams(self) -> int:
        return int(self.config.num_beams or 1)


def plan(model: Any, settings: dict[str, Any], input_ids: torch.Tensor) -> Plan:
    """``generate``'s preparation of ``settings`` for one input (``input_ids``: [1, length]):
    the merged generation config, its lengths, processors and stopping criteria. A setting
    transformers refuses is the client's: InvalidInput."""
    try:
        has_default_max = settings.get("max_length") is None and model.generation_config.max_length is None
        has_default_min = settings.get("min_length") is None and model.generation_config.min_length is None
        config, extra = model._prepare_generation_config(None, **settings)
        if extra:
            raise ValueError(f"unknown generation settings: {sorted(extra)}")
        if (config.num_return_sequences or 1) > 1:
            raise ValueError("num_return_sequences is not served: one text per input")
        if config.get_generation_mode() not in {"greedy_search", "sample", "beam_search", "beam_sample"}:
            raise ValueError(f"generation mode '{config.get_generation_mode()}' is not served")
        device = input_ids.device
        model._prepare_special_tokens(config, True, device=device)
        config = model._prepare_generated_length(
            generation_config=config,
            has_default_max_length=has_default_max,
            has_default_min_length=has_default_min,
            model_input_name="input_ids",
            inputs_tensor=input_ids,
            input_ids_length=1,
        )
        model._validate_generated_length(config, 1, has_default_max)
        processors = model._get_logits_processor(
            generation_config=config,
            input_ids_seq_length=1,
            encoder_input_ids=input_ids,
            prefix_allowed_tokens_fn=None,
            logits_processor=LogitsProcessorList(),
            device=device,
            model_kwargs={},
        )
        stopping = model._get_stopping_criteria(generation_config=config, stopping_criteria=StoppingCriteriaList())
    except ValueError as exc:
        raise InvalidInput(f"model refused these generation settings: {exc}") from exc
    return Plan(config, processors, stopping, int(config._decoder_start_token_tensor.reshape(-1)[0]))


class Search:
    """Greedy or sampled decoding of one input: one row (``_sample``'s token choice)."""

    rows = 1

    def __init__(self, plan: Plan, device: torch.device) -> None:
        self.plan = plan
        self.ids = torch.full((1, plan.config.max_length), plan.start, dtype=torch.long, device=device)
        self.length = 1  # tokens so far, the start token included
        self.done = False

    def choose(self, logits: torch.Tensor) -> torch.Tensor | None:
        """The next token from this input's logits ([1, vocab], float32)."""
        scores = self.plan.processors(self.ids[:, : self.length], logits)
        if self.plan.config.do_sample:
            token = torch.multinomial(torch.nn.functional.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            token = torch.argmax(scores, dim=-1)
        self.ids[:, self.length] = token
        self.length += 1
        self.done = bool(self.plan.stopping(self.ids[:, : self.length], scores).all())
        return None

    @property
    def last(self) -> torch.Tensor:
        return self.ids[:, self.length - 1]

    def settled(self) -> torch.Tensor:
        """The tokens that can no longer change (all of them)."""
        return self.ids[0, 1 : self.length]

    def best(self) -> torch.Tensor:
        return self.ids[0, : self.length]


class Beams:
    """Beam search over one input: its beams are rows of the running batch, and each step
    is ``_beam_search``'s loop body for a batch of one (its helpers, its tensors)."""

    def __init__(self, plan: Plan, device: torch.device, model: Any) -> None:
        config = plan.config
        self.plan, self.model = plan, model
        self.rows = beams = plan.beams
        self.max_length = config.max_length
        eos = config._eos_token_tensor
        self.keep = max(2, 1 + (eos.shape[0] if eos is not None else 0)) * beams
        self.top_mask = torch.cat(
            (torch.ones(beams, dtype=torch.bool), torch.zeros(self.keep - beams, dtype=torch.bool))
        ).to(device)
        pad = config._pad_token_tensor
        fill = int(pad or eos[0]) if eos is not None else -1  # as generate fills
        self.running = torch.full((1, beams, self.max_length), fill, dtype=torch.long, device=device)
        self.running[:, :, 0] = plan.start
        self.sequences = self.running.clone()
        self.running_scores = torch.zeros((1, beams), dtype=torch.float, device=device)
        self.running_scores[:, 1:] = -1e9
        self.scores = torch.full((1, beams), -1e9, dtype=torch.float, device=device)
        self.finished = torch.zeros((1, beams), dtype=torch.bool, device=device)
        self.improvable = torch.ones((1, 1), dtype=torch.bool, device=device)
        self.running_indices = torch.full((1, beams, self.max_length - 1), -1, dtype=torch.int32, device=device)
        self.indices = self.running_indices.clone()
        self.length = 1
        self.done = False

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """One step from this input's logits ([beams, vocab], float32); the beams each new
        row continues (indices into this input's rows), to reorder their caches."""
        m, config, beams, length = self.model, self.plan.config, self.rows, self.length
        log_probs = torch.nn.functional.log_softmax(logits, dim=-1)
        log_probs = self.plan.processors(self.running[0, :, :length], log_probs)
        log_probs = (log_probs[None] + self.running_scores[:, :, None]).reshape(1, -1)
        top_probs, top_sequences, top_indices = m._get_top_k_continuations(
            accumulated_log_probs=log_probs,
            running_sequences=self.running,
            running_beam_indices=self.running_indices,
            cur_len=length,
            decoder_prompt_len=1,
            do_sample=config.do_sample,
            beams_to_keep=self.keep,
            num_beams=beams,
            batch_size=1,
        )
        hits = self.plan.stopping(top_sequences[0, :, : length + 1], None).reshape(1, self.keep)
        self.running, self.running_scores, self.running_indices = m._get_running_beams_for_next_iteration(
            topk_log_probs=top_probs,
            topk_running_sequences=top_sequences,
            topk_running_beam_indices=top_indices,
            next_token_hits_stopping_criteria=hits,
            num_beams=beams,
        )
        self.sequences, self.scores, self.indices, self.finished = m._update_finished_beams(
            sequences=self.sequences,
            topk_running_sequences=top_sequences,
            beam_scores=self.scores,
            topk_log_probs=top_probs,
            beam_indices=self.indices,
            topk_running_beam_indices=top_indices,
            is_early_stop_heuristic_unsatisfied=self.improvable,
            is_sent_finished=self.finished,
            next_token_hits_stopping_criteria=hits,
            top_num_beam_mask=self.top_mask,
            num_beams=beams,
            cur_len=length,
            decoder_prompt_len=1,
            length_penalty=config.length_penalty,
            early_stopping=config.early_stopping,
        )
        order = self.running_indices[0, :, length - 1].long()
        self.length = length = length + 1
        self.improvable = m._check_early_stop_heuristic(
            is_early_stop_heuristic_unsatisfied=self.improvable,
            running_beam_scores=self.running_scores,
            beam_scores=self.scores,
            is_sent_finished=self.finished,
            cur_len=length,
            max_length=self.max_length,
            decoder_prompt_len=1,
            early_stopping=config.early_stopping,
            length_penalty=config.length_penalty,
        )
        self.done = not bool(
            m._beam_search_has_unfinished_sequences(self.improvable, self.finished, hits, config.early_stopping)
        )
        return order

    @property
    def last(self) -> torch.Tensor:
        return self.running[0, :, self.length - 1]

    def settled(self) -> torch.Tensor:
        """The prefix every live beam and every kept finished hypothesis shares: it can no
        longer change."""
        candidates = torch.cat(
            (self.running[0, :, 1 : self.length], self.sequences[0, self.finished[0], 1 : self.length])
        )
        agree = (candidates == candidates[:1]).all(dim=0)
        differ = (~agree).nonzero()
        shared = int(differ[0, 0]) if differ.numel() else candidates.shape[1]
        return candidates[0, :shared]

    def best(self) -> torch.Tensor:
        return self.sequences[0, 0]


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
        """Each sequence chooses its next tokens; beams' caches follow their parents."""
        order: list[torch.Tensor] = []
        reordered = False
        row = 0
        for s in self.sequences:
            rows = s.decoding.rows
            parents = s.decoding.choose(logits[row : row + rows])
            if parents is None:
                order.append(torch.arange(row, row + rows, device=self.device))
            else:
                order.append(parents + row)
                reordered = True
            row += rows
        if reordered:
            index = torch.cat(order)
            assert self.cache is not None
            for layer in _self_layers(self.cache):
                layer.keys = layer.keys.index_select(0, index)
                layer.values = layer.values.index_select(0, index)

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
        logits = out.logits[:, -1, :].to(dtype=torch.float32)
        row = 0
        order = []
        for s in joining:
            rows = s.decoding.rows
            parents = s.decoding.choose(logits[row : row + rows])
            order.append(torch.arange(row, row + rows, device=self.device) if parents is None else parents + row)
            row += rows
        index = torch.cat(order)
        for layer in _self_layers(cache):
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
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
        for layer in (*_self_layers(self.cache), *_cross_layers(self.cache)):
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
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
            text = self.decode(decoding.best().tolist()).strip()
            rest = None
            if s.streaming and len(text) > len(s.sent) and text.startswith(s.sent):  # the text not yet streamed
                rest = GenerationDelta(text[len(s.sent) :], int(decoding.best().numel()) - 1)
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
