"""Each task route's body lists the catalog models that can answer it, and states what each of
them takes (app/api/model_rules.py); a body the document allows is answered, one it forbids
is refused with a 4xx, through the real app in both layouts."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from pydantic import BaseModel

from app.api.model_rules import serves
from app.tasks import Endpoint
from tests.conftest import AppFactory, serve

pytestmark = pytest.mark.anyio


def body_schema(document: dict[str, Any], path: str) -> dict[str, Any]:
    ref = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema: dict[str, Any] = document["components"]["schemas"][ref.rsplit("/", 1)[1]]
    return schema


def allows(document: dict[str, Any], path: str, body: dict[str, Any]) -> bool:
    """Whether the document's schema of ``path``'s body holds for ``body``."""
    schema = {**body_schema(document, path), "components": document["components"]}  # where its $refs point
    return Draft202012Validator(schema).is_valid(body)


def listed(document: dict[str, Any], path: str) -> list[str]:
    model = body_schema(document, path)["properties"]["model"]
    return next(option for option in model.get("anyOf", [model]) if option.get("type") == "string")["enum"]


async def test_each_task_route_lists_the_catalog_models_of_its_endpoint(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    entries = (await client.get("/models")).json()["models"]  # the catalog, in its order

    def of_task(*tasks: str) -> list[str]:
        return [e["name"] for e in entries if e["task"] in tasks]

    assert listed(document, "/embed") == listed(document, "/v1/embeddings") == of_task("embedding")
    assert listed(document, "/fill-mask") == of_task("fill-mask")
    assert listed(document, "/translate") == of_task("translation")
    assert listed(document, "/summarize") == of_task("summarization")
    # /classify: classifiers, and zero-shot models (with the body's labels, or labels of their own).
    assert listed(document, "/classify") == of_task("text-classification", "zero-shot-classification")
    assert document["paths"]["/embed"]["post"]["x-endpoint"] == "embed"


# (route, body, what the server answers); the document must allow exactly the 200s.
CASES = [
    ("/embed", {"inputs": "hi", "model": "bert-embed"}, 200),
    ("/embed", {"inputs": "hi", "model": "bert-clf"}, 400),  # a classifier
    ("/classify", {"inputs": "hi", "model": "bert-clf", "parameters": {"function_to_apply": "sigmoid"}}, 200),
    ("/classify", {"inputs": "hi", "model": "bert-clf", "parameters": {"candidate_labels": ["a", "b"]}}, 400),
    ("/classify", {"inputs": "hi", "model": "nli", "parameters": {"candidate_labels": ["a", "b"]}}, 200),
    ("/classify", {"inputs": "hi", "model": "nli"}, 400),  # no labels of its own
    ("/classify", {"inputs": "hi", "model": "minilm-sentiment"}, 200),  # its own labels
    # Without a model, the default (minilm-sentiment, a zero-shot model) answers: no function_to_apply.
    ("/classify", {"inputs": "hi", "parameters": {"function_to_apply": "sigmoid"}}, 400),
    ("/classify", {"inputs": "hi", "parameters": {"candidate_labels": ["a"], "function_to_apply": "none"}}, 400),
    ("/translate", {"inputs": "hi", "source_lang": "en", "target_lang": "fr"}, 200),  # t5-en-fr's pair
    ("/translate", {"inputs": "hi", "target_lang": "xx"}, 404),  # no catalog pair
    ("/translate", {"inputs": "hi", "model": "marian-en-de", "target_lang": "de"}, 200),
    ("/translate", {"inputs": "hi", "model": "marian-en-de", "target_lang": "fr"}, 400),
    ("/fill-mask", {"inputs": ["a [MASK] here", "the [MASK] ."]}, 200),
    ("/fill-mask", {"inputs": ["a [MASK] here", "none in this one"]}, 400),
    ("/v1/embeddings", {"input": "hi", "model": "minilm", "dimensions": 384}, 200),
    ("/v1/embeddings", {"input": "hi", "model": "minilm", "dimensions": 32}, 400),
    ("/v1/embeddings", {"input": "hi", "model": "bert-embed", "dimensions": 32}, 200),
]


async def test_a_body_the_document_allows_is_answered_and_one_it_forbids_is_refused(
    client: httpx.AsyncClient,
) -> None:
    document = (await client.get("/openapi.json")).json()
    for path, body, status in CASES:
        assert allows(document, path, body) is (status == 200), (path, body)
        answer = await client.post(path, json=body)
        assert answer.status_code == status, (path, body, answer.text)


async def test_a_routes_default_is_the_branch_that_takes_no_model(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    defaults = (await client.get("/models")).json()["defaults"]
    [fill] = body_schema(document, "/fill-mask")["anyOf"]
    assert fill["properties"]["model"]["enum"] == [defaults["fill-mask"], None]
    assert fill["properties"]["inputs"]["pattern"] == r"\[MASK\]"
    # /classify answers a body without labels with its default, one with labels with zero-shot's.
    for branch in body_schema(document, "/classify")["anyOf"]:
        labels = branch["properties"]["parameters"]["properties"]["candidate_labels"]
        models = branch["properties"]["model"]["enum"]
        default = defaults["zero-shot" if labels == {"type": "array"} else "classify"]
        assert (None in models) is (default in models), branch


class MaskedBody(BaseModel):
    inputs: str
    model: str | None = None


async def a_new_route(body: MaskedBody) -> dict[str, str]:
    return {}


async def test_a_new_route_gets_its_models_and_rules_from_its_marker_alone(app_factory: AppFactory) -> None:
    app = app_factory()
    app.post("/fill-mask-too", openapi_extra=serves(Endpoint.fill_mask))(a_new_route)
    async with serve(app) as client:
        document = (await client.get("/openapi.json")).json()
    assert listed(document, "/fill-mask-too") == listed(document, "/fill-mask") == ["bert-fill"]
    [branch] = body_schema(document, "/fill-mask-too")["anyOf"]
    assert branch["properties"]["inputs"]["pattern"] == r"\[MASK\]"
