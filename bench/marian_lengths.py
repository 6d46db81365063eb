"""A random-weight Marian whose greedy translations end at input-dependent steps (40-160 tokens).

Random weights alone never end a sentence usefully: the decoder locks onto repeating one
token, so the end-of-sequence logit's margin under the best other token barely moves from
step to step, and an eos bias ends every output at once or never. Three edits, all to
weights that exist in opus-mt-en-de's shape, give the bench outputs of varied length:

- the initialisation is wider (std 0.035 at d_model 512, not MarianConfig's 0.02; scaled
  by 1/sqrt(d_model) for the smoke run's small model): at 0.02 the decoder barely reads the
  encoder, so every input would end at the same step;
- eos's row of the tied output embedding gains ``SLOPE`` times the direction of the
  decoder's last hidden state that grows with the step (least squares over the candidate
  texts' greedy runs, r^2 ~0.999 at full size), so eos's logit climbs by ~``SLOPE`` per step;
- ``final_logits_bias`` at eos (the buffer MarianMTModel adds to its logits) is set to
  the value that ends the most candidates between ``FIRST`` and ``LAST`` tokens; each input
  crosses at its own step, as its own margin differs. The ~57,000 filler ids past the
  tokenizer's pieces get a bias of -100 (never chosen, still computed) so that every
  answer decodes to words, which the bench counts by re-tokenizing.

The texts served are the candidates whose predicted end lies in ``FIRST..LAST``.
``bench/seq2seq_mixed.py --check-model`` runs ``generate`` on them and prints the spread.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, MarianMTModel, MarianTokenizer
from workloads import MARIAN_PAD, SEED, build_marian, make_texts, marian_config

EOS = 0
INIT_STD_512 = 0.035  # at d_model 512; times sqrt(512 / d_model) for others
SLOPE = 0.015  # eos logit gained per step: the candidates' margins (std ~0.5) spread over ~70 steps
FIRST, LAST = 40, 160  # output tokens (eos included) the served texts' greedy outputs end between
STEPS = LAST + 10  # steps decoded (eos suppressed) to fit the ramp and predict each end
FILLER_BIAS = -100.0  # fits float16 too
CANDIDATES = 64
TEXT_SEED = SEED + 5


@dataclass
class MixedMarian:
    path: Path
    texts: list[str]  # candidates whose predicted greedy end lies in FIRST..LAST
    ends: list[int]  # each text's predicted output length, eos included
    eos_bias: float
    fit_r2: float


class _EosMargins(LogitsProcessor):
    """Records eos's logit minus the best other allowed logit, then keeps eos from being chosen."""

    def __init__(self) -> None:
        self.margins: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        others = scores.clone()
        others[:, [EOS, MARIAN_PAD]] = float("-inf")
        self.margins.append((scores[:, EOS] - others.max(dim=-1).values).float().cpu())
        scores[:, EOS] = float("-inf")
        return scores


def decode_without_eos(
    model: MarianMTModel, tokenizer: MarianTokenizer, texts: list[str], device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding of ``texts`` for STEPS steps with eos suppressed: each step's eos margin
    and the hidden state lm_head read (texts x steps, texts x steps x d_model)."""
    record = _EosMargins()
    hidden: list[torch.Tensor] = []
    hook = model.lm_head.register_forward_hook(lambda _m, args, _out: hidden.append(args[0][:, -1].float().cpu()))
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True).to(device)
        with torch.inference_mode():
            model.generate(**batch, max_new_tokens=STEPS, num_beams=1, logits_processor=LogitsProcessorList([record]))
    finally:
        hook.remove()
    # The last step's logits are forced to eos (forced_eos_token_id): left out.
    return torch.stack(record.margins[: STEPS - 1], 1), torch.stack(hidden[: STEPS - 1], 1)


def step_direction(hidden: torch.Tensor) -> tuple[torch.Tensor, float]:
    """w with hidden[:, t] @ w ~ t + c (ridge least squares), and the fit's r^2."""
    texts, steps, width = hidden.shape
    x = hidden.reshape(-1, width).double()
    y = torch.arange(steps, dtype=torch.float64).repeat(texts)
    x, y = x - x.mean(0), y - y.mean()
    w = torch.linalg.solve(x.T @ x + torch.eye(width, dtype=torch.float64), x.T @ y)
    r2 = 1 - float(((x @ w - y) ** 2).sum() / (y**2).sum())
    return w.float(), r2


def first_crossings(margins: torch.Tensor, bias: float) -> list[int]:
    """Each text's greedy output length with this eos bias (0 where it does not end within STEPS)."""
    ends = []
    for row in margins:
        hit = (row + bias > 0).nonzero()
        ends.append(int(hit[0]) + 1 if len(hit) else 0)
    return ends


def best_bias(margins: torch.Tensor) -> float:
    """The eos bias that ends the most texts within FIRST..LAST (ties: median end nearest the middle)."""
    low, high = float(-margins.max()), float(-margins.min())
    middle = (FIRST + LAST) / 2

    def score(bias: float) -> tuple[int, float]:
        ends = sorted(e for e in first_crossings(margins, bias) if FIRST <= e <= LAST)
        return len(ends), -abs(ends[len(ends) // 2] - middle) if ends else float("-inf")

    return max((low + (high - low) * i / 400 for i in range(401)), key=score)


def build_mixed_marian(path: Path, sizes: dict[str, int] | None = None, device: str = "cpu") -> MixedMarian:
    """bench/workloads.py's Marian (opus-mt-en-de's shape, or ``sizes``) with the edits above, saved
    at ``path``; decoding to fit them runs on ``device``."""
    config = marian_config(**(sizes or {}))
    config.init_std = INIT_STD_512 * (512 / config.d_model) ** 0.5
    build_marian(path, config)
    tokenizer = MarianTokenizer.from_pretrained(str(path))
    model = MarianMTModel.from_pretrained(str(path), dtype=torch.float32).to(device).eval()
    pieces = tokenizer.spm_target.get_piece_size()
    texts = make_texts(CANDIDATES, seed=TEXT_SEED)
    with torch.no_grad():
        model.final_logits_bias[0, pieces:MARIAN_PAD] = FILLER_BIAS
        margins, hidden = decode_without_eos(model, tokenizer, texts, device)
        w, r2 = step_direction(hidden)
        # eos's logit gains SLOPE * (h_t @ w), and so does its margin: the best other token is
        # not eos. The encoder reads the same (tied) row for the </s> ending every input, which
        # moves its states a little: --check-model shows how far the prediction holds.
        model.get_output_embeddings().weight[EOS] += (SLOPE * w).to(device)
        margins = margins + SLOPE * (hidden @ w)
        bias = best_bias(margins)
        model.final_logits_bias[0, EOS] = bias
    model.save_pretrained(path, safe_serialization=True)
    ends = first_crossings(margins, bias)
    kept = [(t, e) for t, e in zip(texts, ends, strict=True) if FIRST <= e <= LAST]
    return MixedMarian(path, [t for t, _ in kept], [e for _, e in kept], bias, r2)


def output_lengths(
    model: MarianMTModel, tokenizer: MarianTokenizer, texts: list[str], device: str, **generation: Any
) -> list[int]:
    """Tokens each text's ``generate`` output has (the decoder start left out, eos counted), one
    text at a time as a c=1 client's would run."""
    lengths = []
    for text in texts:
        batch = tokenizer([text], return_tensors="pt").to(device)
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=STEPS, **generation)
        lengths.append(int(out.shape[1]) - 1)
    return lengths
