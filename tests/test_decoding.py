"""Iteration-level decoding changes no output: a running batch that inputs join mid-flight
gives, for greedy and beam search, the texts ``generate`` gives on the same inputs and
settings (tiny Marian, BART, T5 and M2M100/NLLB models, mixed input lengths, outputs that
end at input-dependent steps and at per-request caps).

Batched float32 can flip a near-tie (a different batch composition rounds differently): a
difference passes only where it is one, i.e. where greedy's top two scores at the first
differing step are within NEAR_TIE, or where beam search's two hypotheses score within
NEAR_TIE of each other; the last test prints how many it saw.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from app.runners.decoding import RunningBatch
from app.runners.search import plan
from tests.tiny_models import corpus

NEAR_TIE = 1e-4
MODELS = ("marian", "bart", "t5", "m2m100")
# no_repeat_ngram_size 1 walks a random model through fresh tokens until its end-of-sequence
# token ranks first: outputs then end at steps that depend on the input.
SETTINGS: dict[str, dict[str, Any]] = {
    "greedy": {"num_beams": 1, "no_repeat_ngram_size": 1},
    "greedy-plain": {"num_beams": 1},
    "greedy-penalties": {"num_beams": 1, "repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "min_new_tokens": 3},
    "beams": {"num_beams": 4, "no_repeat_ngram_size": 1},
    "beams-tuned": {
        "num_beams": 3,
        "length_penalty": 0.6,
        "early_stopping": True,
        "no_repeat_ngram_size": 1,
        "repetition_penalty": 1.2,
        "min_length": 4,
    },
    "beams-never": {"num_beams": 2, "early_stopping": "never", "length_penalty": 1.5},
}
CAPS = (2, 5, 12, 24, 60)
# Per model: the end-of-sequence bias that spreads its outputs' lengths. BART's and
# M2M100's decoders start with their end-of-sequence token, which no_repeat_ngram_size 1
# then bans: their outputs end at the caps.
EOS_BIAS = {"marian": 0.6, "t5": 0.4, "bart": 0.0, "m2m100": 0.0}


class IdTokenizer:
    """Characters to ids and back, for the tiny M2M100 (NLLB's architecture), which has no
    tokenizer of its own here."""

    pad_token_id, eos, first = 1, 2, 4

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [self.first + ord(c) % (self.vocab - self.first) for c in text] + [self.eos]}

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        return " ".join(str(int(i)) for i in ids if int(i) >= self.first)


def build_m2m100() -> tuple[Any, Any]:
    """A tiny M2M100ForConditionalGeneration (NLLB's architecture: sinusoidal positions counted
    past the padding index, a forced target-language token first)."""
    from transformers import M2M100Config, M2M100ForConditionalGeneration

    config = M2M100Config(
        vocab_size=96,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_bos_token_id=3,  # the target language's token, as NLLB's entries force it
    )
    torch.manual_seed(0)
    return M2M100ForConditionalGeneration(config).eval(), IdTokenizer(config.vocab_size)


TEXTS = [text for text in corpus() if len(text) > 10][:40]
SEEN = {"outputs": 0, "near_ties": 0}


@pytest.fixture(scope="module")
def seq2seq(tiny_models: dict[str, Path]) -> Iterator[dict[str, tuple[Any, Any]]]:
    """The tiny models, each with an end-of-sequence bias that makes outputs end at steps
    that depend on the input (a few to a few dozen tokens), not only at the caps."""
    loaded = {}
    for name in MODELS:
        if name == "m2m100":
            model, tokenizer = build_m2m100()
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(tiny_models[name]))
            model = AutoModelForSeq2SeqLM.from_pretrained(str(tiny_models[name])).eval()
        eos = model.config.eos_token_id
        torch.manual_seed(0)
        with torch.no_grad():
            for weights in model.parameters():  # logits far enough apart to pick tokens by
                if weights.dim() >= 2:
                    weights.normal_(0, 0.15)
            if hasattr(model, "final_logits_bias"):
                model.final_logits_bias[0, eos] += EOS_BIAS[name]
            else:  # T5: no bias of its own; one on the head does the same
                head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
                head.weight.copy_(model.lm_head.weight)
                head.bias.zero_()
                head.bias[eos] = EOS_BIAS[name]
                model.lm_head = head
        loaded[name] = (model, tokenizer)
    yield loaded


def reference(model: Any, tokenizer: Any, ids: list[int], setting: dict[str, Any]) -> tuple[str, Any]:
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        output_scores=True,
        return_dict_in_generate=True,
        **setting,
    )
    text = tokenizer.decode(out.sequences[0], skip_special_tokens=True).strip()
    return text, out


def greedy_margin(model: Any, ids: list[int], setting: dict[str, Any], ours: list[int], theirs: list[int]) -> float:
    """The top-two margin of the processed scores at the first step where two greedy outputs part."""
    step = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b)
    prefix = torch.tensor([theirs[:step]])
    prepared = plan(model, setting, torch.tensor([ids]))
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids]), decoder_input_ids=prefix).logits[:, -1, :].float()
    top = prepared.processors(prefix, logits).topk(2).values[0]
    return float(top[0] - top[1])


def run_batch(model: Any, tokenizer: Any, requests: list[tuple[list[int], dict[str, Any], int]]) -> list[Any]:
    """The requests through one running batch, each joining at its step; their finished states."""
    batch = RunningBatch(model, tokenizer.pad_token_id, lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    results: list[Any] = [None] * len(requests)
    waiting = list(enumerate(requests))
    index: dict[int, int] = {}
    step = 0
    while waiting or batch.sequences:
        joining = []
        for i, (ids, setting, _) in [w for w in waiting if w[1][2] <= step]:
            sequence = batch.start(plan(model, setting, torch.tensor([ids])), ids, False, True)
            index[id(sequence)] = i
            joining.append(sequence)
        waiting = [w for w in waiting if w[1][2] > step]
        for progress in batch.step(joining):
            if progress.result is not None:
                results[index[id(progress.sequence)]] = (progress.result.text, progress.sequence.decoding)
        step += 1
        assert step < 500
    return results


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    model_name=st.sampled_from(MODELS),
    setting_name=st.sampled_from(sorted(SETTINGS)),
    requests=st.lists(
        st.tuples(st.sampled_from(range(len(TEXTS))), st.sampled_from(CAPS), st.integers(0, 30)),
        min_size=1,
        max_size=7,
    ),
)
def test_a_running_batch_that_inputs_join_mid_flight_gives_generates_outputs(
    seq2seq: dict[str, tuple[Any, Any]], model_name: str, setting_name: str, requests: list[tuple[int, int, int]]
) -> None:
    model, tokenizer = seq2seq[model_name]
    asked = [
        (tokenizer(TEXTS[text])["input_ids"], {**SETTINGS[setting_name], "max_new_tokens": cap}, join)
        for text, cap, join in requests
    ]
    got = run_batch(model, tokenizer, asked)
    for (ids, setting, _), (text, decoding) in zip(asked, got, strict=True):
        want, out = reference(model, tokenizer, ids, setting)
        SEEN["outputs"] += 1
        if text == want:
            continue
        if setting["num_beams"] == 1:
            margin = greedy_margin(model, ids, setting, decoding.best().tolist(), out.sequences[0].tolist())
        else:
            margin = abs(float(decoding.scores[0, 0]) - float(out.sequences_scores[0]))
        assert margin < NEAR_TIE, f"{model_name} {setting}: {text!r} != generate's {want!r} (margin {margin})"
        SEEN["near_ties"] += 1


def test_outputs_end_at_input_dependent_steps_not_only_at_the_caps(seq2seq: dict[str, tuple[Any, Any]]) -> None:
    """The property test above would prove little if every output ran to its cap."""
    for name in ("marian", "t5"):
        model, tokenizer = seq2seq[name]
        lengths = set()
        for text in random.Random(0).sample(TEXTS, 12):
            ids = tokenizer(text)["input_ids"]
            out = model.generate(torch.tensor([ids]), max_new_tokens=60, **SETTINGS["greedy"])
            lengths.add(out.shape[1] - 1)
        assert len(lengths) >= 4 and min(lengths) < 30, (name, sorted(lengths))


def test_near_ties_reported(capsys: pytest.CaptureFixture[str]) -> None:
    """Prints how many outputs differed from generate's at a near-tie (all others are equal)."""
    assert SEEN["outputs"] > 0
    with capsys.disabled():
        print(f"\n[decoding] {SEEN['near_ties']} near-tie difference(s) among {SEEN['outputs']} outputs compared")
