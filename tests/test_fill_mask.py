"""Fill-mask, the task added by following the README's steps for a new task: its answers are
transformers' fill-mask pipeline's on the same model, through /fill-mask and through the
Hugging Face route, and an input without the model's mask token is refused, naming it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from transformers import pipeline

pytestmark = pytest.mark.anyio

TEXTS = ["the movie was [MASK] .", "my [MASK] felt [MASK] today ."]


def reference(model_dir: Path, text: str, **kwargs: Any) -> list[list[dict[str, Any]]]:
    """The pipeline's answer, always as a list per mask token."""
    answer = pipeline("fill-mask", model=str(model_dir))(text, **kwargs)
    return answer if isinstance(answer[0], list) else [answer]


def same(got: list[list[dict[str, Any]]], want: list[list[dict[str, Any]]]) -> None:
    assert [[c["token_str"] for c in mask] for mask in got] == [[c["token_str"] for c in mask] for mask in want]
    assert [[c["sequence"] for c in mask] for mask in got] == [[c["sequence"] for c in mask] for mask in want]
    for got_mask, want_mask in zip(got, want, strict=True):
        assert [c["score"] for c in got_mask] == pytest.approx([c["score"] for c in want_mask], abs=1e-5)


async def test_fill_mask_answers_as_the_transformers_pipeline(
    client: httpx.AsyncClient, tiny_models: dict[str, Path]
) -> None:
    r = await client.post("/fill-mask", json={"inputs": TEXTS, "parameters": {"top_k": 3}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "bert-fill" and body["truncated"] == [False, False]
    assert [len(masks) for masks in body["results"]] == [1, 2]  # one list per mask token
    for text, got in zip(TEXTS, body["results"], strict=True):
        same(got, reference(tiny_models["bert-mlm"], text, top_k=3))


async def test_targets_limit_the_candidates(client: httpx.AsyncClient, tiny_models: dict[str, Path]) -> None:
    targets = ["great", "boring", "slow"]
    body = {"inputs": TEXTS[0], "parameters": {"top_k": 2, "targets": targets}}
    got = (await client.post("/fill-mask", json=body)).json()["results"][0]
    assert {c["token_str"] for c in got[0]} <= set(targets)
    same(got, reference(tiny_models["bert-mlm"], TEXTS[0], top_k=2, targets=targets))


async def test_the_hugging_face_route_speaks_fill_mask(client: httpx.AsyncClient, tiny_models: dict[str, Path]) -> None:
    one = (await client.post("/models/bert-fill", json={"inputs": TEXTS[0], "parameters": {"top_k": 2}})).json()
    same([one], reference(tiny_models["bert-mlm"], TEXTS[0], top_k=2))  # one mask: its candidates
    two = (await client.post("/models/bert-fill", json={"inputs": TEXTS[1], "parameters": {"top_k": 2}})).json()
    same(two, reference(tiny_models["bert-mlm"], TEXTS[1], top_k=2))  # two masks: a list per mask


async def test_an_input_without_the_models_mask_token_is_refused_naming_it(client: httpx.AsyncClient) -> None:
    r = await client.post("/fill-mask", json={"inputs": ["a [MASK] here", "none in this one"]})
    assert r.status_code == 400, r.text  # valid text, but not one this model can fill
    assert "input 1: the text holds no mask token; put [MASK] where a word should be predicted" in r.json()["message"]


async def test_fill_mask_has_its_own_model_list_and_refuses_other_tasks(client: httpx.AsyncClient) -> None:
    r = await client.post("/fill-mask", json={"inputs": "a [MASK]", "model": "bert-clf"})
    assert r.status_code == 400 and "not /fill-mask" in r.json()["message"]
    assert (await client.get("/models")).json()["defaults"]["fill-mask"] == "bert-fill"


async def test_the_hf_body_of_a_fill_mask_model_asks_for_its_mask_token(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    body = document["paths"]["/models/bert-fill"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    inputs = document["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]["properties"]["inputs"]
    assert inputs["anyOf"][0]["allOf"][1] == {"pattern": r"\[MASK\]"}
    r = await client.post("/models/bert-fill", json={"inputs": "no mask here"})
    assert r.status_code == 422  # the schema's rule: this model's body names its token
    assert "input 0 holds no mask token; put [MASK] where a word should be predicted" in r.json()["message"]
