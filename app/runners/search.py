"""Each request's token choice, as ``generate`` makes it: ``plan`` prepares a request's
generation settings with ``generate``'s own steps (the merged config, special tokens,
lengths, logits processors, stopping criteria); ``Search`` is ``_sample``'s choice (greedy
and sampling) for one row, ``Beams`` runs ``_beam_search``'s loop body for a batch of one
with its helpers. The running batch (app/runners/decoding.py) feeds them logits, a step at a
time. These are transformers' private methods: pinned in pyproject.toml and guarded by
tests/test_framework_internals.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

from app.errors import InvalidInput

# Settings whose logits processors read the request's own input: planned per input.
PER_INPUT_SETTINGS = ("encoder_no_repeat_ngram_size", "encoder_repetition_penalty")


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
