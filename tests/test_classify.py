"""/classify: text-classification models, NLI and similarity zero-shot, and their errors."""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

pytestmark = pytest.mark.anyio


async def test_offline_default_classifies_sentiment_with_the_packaged_model(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post("/classify", json={"inputs": ["I love this movie", "This film was a boring waste of time"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "minilm-sentiment"  # the hub default is not cached, so the local one answers
    assert [res[0]["label"] for res in body["results"]] == ["positive", "negative"]
    assert body["truncated"] == [False, False]


async def test_scores_are_the_models_own_logits_through_function_to_apply(
    client: httpx.AsyncClient, tiny_models: dict[str, Path]
) -> None:
    text = "the quick brown fox jumps"
    tok = AutoTokenizer.from_pretrained(tiny_models["bert-clf"])
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert-clf"]).eval()
    with torch.inference_mode():
        logits = model(**tok(text, return_tensors="pt")).logits[0].tolist()

    raw = await client.post(
        "/classify",
        json={
            "inputs": text,
            "model": "bert-clf",
            "parameters": {"top_k": None, "function_to_apply": "none"},
        },
    )
    assert raw.status_code == 200, raw.text
    by_label = {s["label"]: s["score"] for s in raw.json()["results"][0]}
    assert by_label["NEGATIVE"] == pytest.approx(logits[0], abs=1e-4)
    assert by_label["POSITIVE"] == pytest.approx(logits[1], abs=1e-4)

    soft = (
        await client.post("/classify", json={"inputs": text, "model": "bert-clf", "parameters": {"top_k": None}})
    ).json()
    scores = [s["score"] for s in soft["results"][0]]
    assert scores == sorted(scores, reverse=True)
    assert sum(scores) == pytest.approx(1.0, abs=1e-5)

    sig = await client.post(
        "/classify",
        json={
            "inputs": text,
            "model": "bert-clf",
            "parameters": {"top_k": None, "function_to_apply": "sigmoid"},
        },
    )
    by_label = {s["label"]: s["score"] for s in sig.json()["results"][0]}
    assert by_label["POSITIVE"] == pytest.approx(1 / (1 + math.exp(-logits[1])), abs=1e-4)


async def test_top_k_defaults_to_the_best_label_and_lists_answer_in_order(client: httpx.AsyncClient) -> None:
    texts = ["one small dog", "a red house by the river", "green tea"]
    together = (await client.post("/classify", json={"inputs": texts, "model": "distilbert-clf"})).json()
    assert together["model"] == "distilbert-clf"
    assert all(len(r) == 1 for r in together["results"])
    for text, result in zip(texts, together["results"], strict=True):
        alone = (await client.post("/classify", json={"inputs": text, "model": "distilbert-clf"})).json()
        assert alone["results"][0][0]["label"] == result[0]["label"]
        assert alone["results"][0][0]["score"] == pytest.approx(result[0]["score"], abs=1e-5)


async def test_nli_zero_shot_matches_the_transformers_pipeline(
    client: httpx.AsyncClient, tiny_models: dict[str, Path]
) -> None:
    text, labels = "the cat sat on the mat", ["animals", "finance", "sports"]
    reference = pipeline("zero-shot-classification", model=str(tiny_models["nli"]))
    for multi_label in (False, True):
        expected = reference(text, candidate_labels=labels, multi_label=multi_label)
        r = await client.post(
            "/classify",
            json={
                "inputs": text,
                "model": "nli",
                "parameters": {"candidate_labels": labels, "multi_label": multi_label, "top_k": None},
            },
        )
        assert r.status_code == 200, r.text
        got = {s["label"]: s["score"] for s in r.json()["results"][0]}
        for label, score in zip(expected["labels"], expected["scores"], strict=True):
            assert got[label] == pytest.approx(score, abs=1e-4)


async def test_candidate_labels_without_a_model_use_the_zero_shot_default(client: httpx.AsyncClient) -> None:
    r = await client.post("/classify", json={"inputs": "hello", "parameters": {"candidate_labels": ["a", "b"]}})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "nli"


async def test_similarity_zero_shot_picks_the_closest_label(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/classify",
        json={
            "inputs": ["The striker scored twice in the final", "The central bank raised interest rates"],
            "model": "minilm-sentiment",
            "parameters": {"candidate_labels": ["sports", "economy", "cooking"], "top_k": None},
        },
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [res[0]["label"] for res in results] == ["sports", "economy"]
    assert sum(s["score"] for s in results[0]) == pytest.approx(1.0, abs=1e-5)


async def test_input_over_the_model_maximum_is_truncated_and_flagged(client: httpx.AsyncClient) -> None:
    r = await client.post("/classify", json={"inputs": ["word " * 2000, "short"], "model": "bert-clf"})
    assert r.status_code == 200, r.text
    assert r.json()["truncated"] == [True, False]


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"inputs": "x", "model": "nope"}, 404, "models for /classify: "),
        ({"inputs": "x", "model": "minilm"}, 400, "not /classify"),
        (
            {"inputs": "x", "model": "bert-clf", "parameters": {"candidate_labels": ["a"]}},
            400,
            "not /zero-shot",
        ),
        ({"inputs": ""}, 422, "empty or blank"),
        ({"inputs": []}, 422, "empty list"),
        ({"inputs": ["ok", "   "]}, 422, "input 1 is empty or blank"),
        ({"inputs": 42}, 422, "inputs"),
        ({"text": "hello"}, 422, "inputs"),
        ({"inputs": "x", "parameters": {"top_k": 0}}, 422, "top_k"),
        (
            {"inputs": "x", "parameters": {"candidate_labels": ["a"], "hypothesis_template": "no slot"}},
            422,
            "{}",
        ),
    ],
)
async def test_bad_requests_get_a_clear_4xx(
    client: httpx.AsyncClient, body: dict[str, object], status: int, fragment: str
) -> None:
    r = await client.post("/classify", json=body)
    assert r.status_code == status, r.text
    err = r.json()
    assert fragment in err["message"]
    assert err["request_id"] == r.headers["x-request-id"]


async def test_malformed_json_is_a_422_not_a_500(client: httpx.AsyncClient) -> None:
    r = await client.post("/classify", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert r.json()["error"] == "invalid_input"


async def test_known_model_names_are_listed_on_404(client: httpx.AsyncClient) -> None:
    r = await client.post("/classify", json={"inputs": "x", "model": "nope"})
    assert {"bert-clf", "distilbert-clf", "minilm-sentiment"} <= set(r.json()["message"].split(": ")[-1].split(", "))


async def test_braces_in_a_hypothesis_template_are_text_not_a_500(client: httpx.AsyncClient) -> None:
    for template in ("About {} {x}", "About {}{", "{0} is {}"):
        r = await client.post(
            "/classify",
            json={
                "inputs": "hello",
                "model": "nli",
                "parameters": {"candidate_labels": ["a", "b"], "hypothesis_template": template},
            },
        )
        assert r.status_code == 200, (template, r.text)
