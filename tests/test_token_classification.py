"""Token classification, added by the README's steps for a new task: its entities are
transformers' TokenClassificationPipeline's on the same model, for every aggregation
strategy, with character offsets into the text as sent (non-ASCII included), through
/token-classification and the Hugging Face route; long texts are truncated and flagged, or
read in windows with ``stride``."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import pipeline

from app.catalog import TokenClassificationEntry
from app.payloads import TokenClassifyInput
from app.runners.token_classification import TokenClassificationRunner
from tests.tiny_models import corpus

pytestmark = pytest.mark.anyio

STRATEGIES = ["none", "simple", "first", "average", "max"]
TEXTS = ["My name is Clara and I live in Berkeley, California.", "Zoë met José in Zürich — naïve café 東京 🙂!"]


@cache
def reference_pipeline(model_dir: Path) -> Any:
    return pipeline("token-classification", model=str(model_dir))


def reference(model_dir: Path, text: str, **kwargs: Any) -> list[dict[str, Any]]:
    return [
        {k: v.item() if hasattr(v, "item") else v for k, v in e.items()}
        for e in reference_pipeline(model_dir)(text, **kwargs)
    ]


def same(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    keys = lambda e: {k: v for k, v in e.items() if k != "score"}  # noqa: E731
    assert [keys(e) for e in got] == [keys(e) for e in want]
    assert [e["score"] for e in got] == pytest.approx([e["score"] for e in want], abs=1e-4)


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_entities_are_the_pipelines_for_each_aggregation_strategy(
    client: httpx.AsyncClient, tiny_models: dict[str, Path], strategy: str
) -> None:
    body = {"inputs": TEXTS, "parameters": {"aggregation_strategy": strategy}}
    r = await client.post("/token-classification", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["model"] == "bert-ner" and answer["truncated"] == [False, False]
    for text, got in zip(TEXTS, answer["results"], strict=True):
        want = reference(tiny_models["bert-ner"], text, aggregation_strategy=strategy)
        assert want, "the random model labels some tokens of every text"
        same(got, want)
        for entity in got:  # offsets index the text as sent
            assert 0 <= entity["start"] < entity["end"] <= len(text)


async def test_ignore_labels_and_the_hugging_face_route(
    client: httpx.AsyncClient, tiny_models: dict[str, Path]
) -> None:
    params = {"aggregation_strategy": "first", "ignore_labels": ["O", "PER"]}  # aggregated labels
    one = await client.post("/models/bert-ner", json={"inputs": TEXTS[0], "parameters": params})
    assert one.status_code == 200, one.text
    same(one.json(), reference(tiny_models["bert-ner"], TEXTS[0], **params))  # one text: its entities
    assert all(e["entity_group"] != "PER" for e in one.json())
    everything = await client.post(
        "/token-classification", json={"inputs": TEXTS[1], "parameters": {"ignore_labels": []}}
    )
    tokens = reference(tiny_models["bert-ner"], TEXTS[1], aggregation_strategy="simple", ignore_labels=[])
    same(everything.json()["results"][0], tokens)  # nothing ignored, "O" included


async def test_a_long_text_is_truncated_and_flagged_or_read_in_windows_with_stride(
    client: httpx.AsyncClient, tiny_models: dict[str, Path]
) -> None:
    text = " ".join(corpus()[:250])  # over twice the model's 512 tokens
    cut = (await client.post("/token-classification", json={"inputs": text})).json()
    assert cut["truncated"] == [True]
    assert max(e["end"] for e in cut["results"][0]) < len(text) // 2
    params = {"aggregation_strategy": "simple", "stride": 64}
    whole = await client.post("/token-classification", json={"inputs": text, "parameters": params})
    assert whole.status_code == 200 and whole.json()["truncated"] == [False]
    same(whole.json()["results"][0], reference(tiny_models["bert-ner"], text, **params))
    assert max(e["end"] for e in whole.json()["results"][0]) > len(text) // 2
    refused = await client.post(
        "/models/bert-ner", json={"inputs": text, "parameters": {"truncation": "do_not_truncate"}}
    )
    assert refused.status_code == 413 and "truncation was refused" in refused.json()["message"]


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"stride": 8}, "stride needs an aggregation_strategy"),
        ({"stride": 8, "aggregation_strategy": "none"}, "stride needs an aggregation_strategy"),
        ({"aggregation_strategy": "longest"}, "aggregation_strategy"),
    ],
)
async def test_parameters_that_cannot_work_are_refused_naming_the_fix(
    client: httpx.AsyncClient, parameters: dict[str, Any], message: str
) -> None:
    r = await client.post("/token-classification", json={"inputs": "hello", "parameters": parameters})
    assert r.status_code == 422 and message in r.text, r.text


async def test_a_model_of_another_task_is_refused(client: httpx.AsyncClient) -> None:
    r = await client.post("/token-classification", json={"inputs": "hello", "model": "bert-clf"})
    assert r.status_code == 400 and "bert-ner" in r.json()["message"]


# -- the property: any text, any strategy, the pipeline's entities -------------------------

WORDS = st.sampled_from(sorted({w for line in corpus()[:200] for w in line.split()}))
ODD = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=6)
TEXT = st.lists(st.one_of(WORDS, WORDS, ODD), min_size=1, max_size=24).map(" ".join).filter(str.strip)


@pytest.fixture(scope="module")
def runner(tiny_models: dict[str, Path]) -> TokenClassificationRunner:
    entry = TokenClassificationEntry.model_validate(
        {"name": "n", "task": "token-classification", "source": {"path": "."}}
    )
    return TokenClassificationRunner(entry, tiny_models["bert-ner"], torch.device("cpu"), torch.float32)


@settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(texts=st.lists(TEXT, min_size=1, max_size=4), strategy=st.sampled_from(STRATEGIES))
def test_any_batch_of_texts_gives_the_pipelines_entities_and_offsets(
    runner: TokenClassificationRunner, tiny_models: dict[str, Path], texts: list[str], strategy: str
) -> None:
    payloads = [TokenClassifyInput(t, strategy) for t in texts]
    results = runner.infer(payloads, runner.encode(payloads))  # one padded batch, as the batcher runs it
    for text, result in zip(texts, results, strict=True):
        same(result.entities, reference(tiny_models["bert-ner"], text, aggregation_strategy=strategy))
        for entity in result.entities:
            assert 0 <= entity["start"] <= entity["end"] <= len(text)
