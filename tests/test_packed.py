"""The packed forward: the model's own outputs on ragged batches, used only where it matches."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi import FastAPI
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    ElectraConfig,
    ElectraForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    pipeline,
)

from app.catalog import TextClassificationEntry
from app.runners.classification import ClassificationRunner
from app.runners.forward import encoder_forward
from app.runners.packed import PackedEncoder, packable
from app.runners.tokens import pad_rows
from tests.conftest import core_of, serve

RAGGED = (12, 3, 7, 1)


def ragged_batch(vocab_size: int, lengths: tuple[int, ...], pairs: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded random ids; with ``pairs`` the second half of each row is segment 1."""
    generator = torch.Generator().manual_seed(7)
    rows = [torch.randint(5, vocab_size, (n,), generator=generator).tolist() for n in lengths]
    types = [[0] * (n - n // 2) + [1] * (n // 2) for n in lengths] if pairs else None
    return pad_rows(rows, 0, types, torch.device("cpu"))


# The size of the tiny models built in tests/tiny_models.py, for architectures built here.
TINY = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def load(kind: Any, path: Path) -> Any:
    return kind.from_pretrained(str(path)).eval()


def eager_and_packed(model: Any, batch: dict[str, torch.Tensor], output: str) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        return model(**batch)[output], PackedEncoder(model, output)(**batch)[output]


@pytest.mark.parametrize(("name", "pairs"), [("bert-clf", True), ("distilbert-clf", False)])
def test_packed_classifiers_give_the_models_logits(tiny_models: dict[str, Path], name: str, pairs: bool) -> None:
    model = load(AutoModelForSequenceClassification, tiny_models[name])
    assert packable(model, "logits")
    want, got = eager_and_packed(model, ragged_batch(model.config.vocab_size, RAGGED, pairs=pairs), "logits")
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5)


def test_packed_hidden_states_equal_the_model_on_real_tokens_and_are_zero_on_padding(
    tiny_models: dict[str, Path],
) -> None:
    model = load(AutoModel, tiny_models["bert-embed"])
    batch = ragged_batch(model.config.vocab_size, RAGGED, pairs=False)
    real = batch["attention_mask"].unsqueeze(-1).bool()
    want, got = eager_and_packed(model, batch, "last_hidden_state")
    assert torch.allclose(got.masked_select(real), want.masked_select(real), atol=1e-5)
    assert not got.masked_select(~real).any()


def test_roberta_positions_count_from_after_the_padding_index() -> None:
    config = RobertaConfig(**TINY, max_position_embeddings=40, pad_token_id=1, num_labels=3)
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(config).eval()
    assert packable(model, "logits")
    batch = ragged_batch(config.vocab_size, RAGGED, pairs=False)
    batch["input_ids"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, config.pad_token_id)
    want, got = eager_and_packed(model, batch, "logits")
    assert torch.allclose(got, want, atol=1e-5)


def test_architectures_it_does_not_know_run_padded(tiny_models: dict[str, Path]) -> None:
    config = ElectraConfig(**TINY, embedding_size=32, num_labels=2)
    electra = ElectraForSequenceClassification(config).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models["bert-clf"]))  # only its input names matter
    assert not packable(electra, "logits")
    forward = encoder_forward(electra, "logits", tokenizer, "test-electra", None)
    assert forward.traced and not forward.packed


def test_ragged_batches_run_packed_and_even_ones_padded(tiny_models: dict[str, Path]) -> None:
    model = load(AutoModelForSequenceClassification, tiny_models["bert-clf"])
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models["bert-clf"]))
    forward = encoder_forward(model, "logits", tokenizer, "test-bert-routing", None)
    assert forward.traced and forward.packed
    calls: list[int] = []
    packed = forward._packed

    def counting(**batch: torch.Tensor) -> Any:
        calls.append(len(batch["input_ids"]))
        return packed(**batch)

    forward._packed = counting
    with torch.inference_mode():
        for lengths in ((9, 9, 9), RAGGED):
            batch = ragged_batch(model.config.vocab_size, lengths)
            assert torch.allclose(forward(batch), model(**batch).logits, atol=1e-5)
    assert calls == [len(RAGGED)]  # only the ragged batch ran packed


@pytest.mark.anyio
async def test_served_ragged_inputs_match_the_transformers_pipeline(
    app_factory: Callable[..., FastAPI], tiny_models: dict[str, Path]
) -> None:
    texts = ["good", "a much longer text about a movie that was not good at all, sadly", "fine film"]
    body = {"inputs": texts, "model": "bert-clf", "parameters": {"top_k": None}}
    app = app_factory()
    async with serve(app) as client:
        served = (await client.post("/classify", json=body)).json()["results"]
        slot = core_of(app).registry.slot("bert-clf")
        assert slot.runner.forward.packed
    reference = pipeline("text-classification", model=str(tiny_models["bert-clf"]), top_k=None)
    for got, want in zip(served, reference(texts), strict=True):
        assert [x["label"] for x in got] == [y["label"] for y in want]
        assert [x["score"] for x in got] == pytest.approx([y["score"] for y in want], abs=1e-5)


def test_an_entry_can_turn_packing_off(tiny_models: dict[str, Path]) -> None:
    source = {"path": str(tiny_models["bert-clf"])}
    runners = {
        packed: ClassificationRunner(
            TextClassificationEntry(
                name=f"test-packed-{packed}", task="text-classification", source=source, packed=packed
            ),
            tiny_models["bert-clf"],
            torch.device("cpu"),
            torch.float32,
        )
        for packed in (None, False)
    }
    assert runners[None].forward.packed
    assert not runners[False].forward.packed and runners[False].forward.traced
