"""Clients people already use, unchanged: huggingface_hub's InferenceClient and the openai client.

Both are synchronous HTTP clients, so these tests run the app in a real uvicorn server on
a background thread and point the clients at it; answers are checked against our own
task routes on the same server.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cohere
import httpx
import huggingface_hub.constants
import numpy as np
import openai
import pytest
from fastapi import FastAPI
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError

from app.config import Settings
from app.main import create_app
from tests.conftest import running

KEY = "secret-key"


@pytest.fixture(scope="module")
def base_url(catalog_path: Path) -> Iterator[str]:
    # What app_factory() builds, once for the module: models then load once for every test.
    with running(create_app(Settings(catalog=catalog_path, hub="offline", load_retry_after_s=0.5))) as url:
        yield url


@pytest.fixture(autouse=True)
def hub_client_online(monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub refuses every request, even to our own server, when HF_HUB_OFFLINE
    # is set (conftest sets it): a client process must not set it.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture(scope="module")
def ours(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=120) as client:
        yield client


def hf(base_url: str, model: str, **kwargs: Any) -> InferenceClient:
    return InferenceClient(f"{base_url}/models/{model}", timeout=120, **kwargs)


def oa(base_url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=120)


def post(client: httpx.Client, path: str, body: dict[str, Any]) -> Any:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


# -- Hugging Face Inference API ---------------------------------------------------------


def test_hf_text_classification_returns_every_label_best_first(base_url: str, ours: httpx.Client) -> None:
    answer = hf(base_url, "bert-clf").text_classification("I love this movie")
    expected = post(
        ours, "/classify", {"inputs": "I love this movie", "model": "bert-clf", "parameters": {"top_k": None}}
    )
    scores = [a.score for a in answer]
    assert len(answer) >= 2 and scores == sorted(scores, reverse=True)
    assert [(a.label, pytest.approx(a.score)) for a in answer] == [
        (e["label"], e["score"]) for e in expected["results"][0]
    ]
    top = hf(base_url, "bert-clf").text_classification("I love this movie", top_k=1, function_to_apply="sigmoid")
    assert len(top) == 1 and 0 < top[0].score < 1


def test_hf_zero_shot_classification_scores_the_candidate_labels(base_url: str) -> None:
    labels = ["sports", "politics", "technology"]
    answer = hf(base_url, "nli").zero_shot_classification("The new GPU is fast.", labels)
    assert sorted(a.label for a in answer) == sorted(labels)
    assert [a.score for a in answer] == sorted((a.score for a in answer), reverse=True)
    assert sum(a.score for a in answer) == pytest.approx(1.0, abs=1e-4)
    multi = hf(base_url, "nli").zero_shot_classification(
        "The new GPU is fast.", labels, multi_label=True, hypothesis_template="This is about {}."
    )
    assert len(multi) == 3


def test_hf_translation_and_summarization_answer_what_our_routes_answer(base_url: str, ours: httpx.Client) -> None:
    text = "The weather is nice today."
    translated = hf(base_url, "marian-en-de").translation(text, src_lang="en", tgt_lang="de")
    expected = post(ours, "/translate", {"inputs": text, "model": "marian-en-de"})
    assert isinstance(translated.translation_text, str)
    assert translated.translation_text == expected["results"][0]["translation_text"]

    summary = hf(base_url, "bart-sum").summarization(text, generate_parameters={"num_beams": 1})
    expected = post(ours, "/summarize", {"inputs": text, "model": "bart-sum"})
    assert summary.summary_text == expected["results"][0]["summary_text"]


def test_hf_feature_extraction_gives_the_vectors_of_embed(base_url: str, ours: httpx.Client) -> None:
    texts = ["A man is eating food.", "Someone is having a meal."]
    expected = np.array(post(ours, "/embed", {"inputs": texts, "model": "minilm"})["embeddings"])
    one = hf(base_url, "minilm").feature_extraction(texts[0])
    assert one.shape in ((384,), (1, 384))
    np.testing.assert_allclose(one.reshape(-1), expected[0], atol=1e-6)
    both = hf(base_url, "minilm").feature_extraction(texts, normalize=True, truncate=True)
    assert both.shape == (2, 384)
    np.testing.assert_allclose(both, expected, atol=1e-6)


def test_hf_client_shows_our_message_for_an_unknown_model(base_url: str) -> None:
    with pytest.raises(HfHubHTTPError) as caught:
        hf(base_url, "no-such-model").text_classification("hello")
    assert caught.value.response.status_code == 404
    assert "unknown model 'no-such-model'" in str(caught.value)


def test_hf_parameters_without_meaning_here_are_refused_by_name(base_url: str, ours: httpx.Client) -> None:
    with pytest.raises(HfHubHTTPError) as caught:
        hf(base_url, "marian-en-de").translation("Hello", generate_parameters={"typical_p": 0.5})
    assert caught.value.response.status_code == 422
    assert "parameters.generate_parameters.typical_p" in str(caught.value)

    with pytest.raises(HfHubHTTPError) as caught:
        hf(base_url, "marian-en-de").translation("Hello", src_lang="en", tgt_lang="fr")
    # The path names the model, so its body names its languages: the schema refuses others.
    assert caught.value.response.status_code == 422
    assert "parameters.tgt_lang: Input should be 'de'" in str(caught.value)

    response = ours.post("/models/bert-clf", json={"inputs": "hi", "parameters": {"temperature": 2}})
    assert response.status_code == 422
    assert response.json()["error"] == "invalid_input"
    assert "parameters.temperature" in response.json()["message"]
    assert response.headers["x-error-message"] == response.json()["message"]


def test_hf_token_classification_gives_the_entities_of_our_route(base_url: str, ours: httpx.Client) -> None:
    text = "Zoë met José in Zürich, near the café."
    entities = hf(base_url, "bert-ner").token_classification(text, aggregation_strategy="first")
    expected = post(ours, "/token-classification", {"inputs": text, "parameters": {"aggregation_strategy": "first"}})
    assert entities, "the random model finds some entities"
    got = [(e.entity_group, e.word, e.start, e.end, pytest.approx(e.score)) for e in entities]
    assert got == [(e["entity_group"], e["word"], e["start"], e["end"], e["score"]) for e in expected["results"][0]]
    tokens = hf(base_url, "bert-ner").token_classification(text, aggregation_strategy="none", ignore_labels=[])
    every = post(
        ours,
        "/token-classification",
        {"inputs": text, "parameters": {"aggregation_strategy": "none", "ignore_labels": []}},
    )
    assert [(t.entity, t.start, t.end) for t in tokens] == [
        (e["entity"], e["start"], e["end"]) for e in every["results"][0]
    ]
    assert all(t.entity_group is None for t in tokens) and (tokens[0].start, tokens[-1].end) == (0, len(text))


def test_hf_sentence_similarity_of_a_reranker_gives_its_scores_in_order(base_url: str, ours: httpx.Client) -> None:
    documents = ["The train to Paris leaves at noon.", "My garden is green.", "Trains leave from platform two."]
    scores = hf(base_url, "bert-rerank").sentence_similarity("When does the train leave?", documents)
    ranked = post(ours, "/rerank", {"query": "When does the train leave?", "texts": documents, "model": "bert-rerank"})
    assert scores == pytest.approx([next(r["score"] for r in ranked if r["index"] == i) for i in range(3)])


# -- Cohere rerank ------------------------------------------------------------------------


def test_the_cohere_clients_rerank_unchanged(base_url: str, ours: httpx.Client) -> None:
    documents = ["The train to Paris leaves at noon.", "My garden is green.", "Trains leave from platform two."]
    expected = post(
        ours, "/rerank", {"query": "When does the train leave?", "texts": documents, "model": "bert-rerank"}
    )
    v1 = cohere.Client(api_key="unused", base_url=base_url, timeout=120)
    answer = v1.rerank(query="When does the train leave?", documents=documents, model="bert-rerank", top_n=2)
    assert [(r.index, pytest.approx(r.relevance_score)) for r in answer.results] == [
        (e["index"], e["score"]) for e in expected[:2]
    ]
    assert [r.document.text for r in answer.results if r.document] == [documents[e["index"]] for e in expected[:2]]
    v2 = cohere.ClientV2(api_key="unused", base_url=base_url, timeout=120)
    again = v2.rerank(model="bert-rerank", query="When does the train leave?", documents=documents)
    assert [(r.index, pytest.approx(r.relevance_score)) for r in again.results] == [
        (e["index"], e["score"]) for e in expected
    ]
    with pytest.raises(cohere.errors.NotFoundError):
        v2.rerank(model="rerank-v3.5", query="q", documents=["d"])  # a model the catalog lacks: 404, said


# -- OpenAI embeddings ------------------------------------------------------------------


def test_openai_embeddings_float_and_base64_match_embed(base_url: str, ours: httpx.Client) -> None:
    texts = ["A man is eating food.", "Someone is having a meal."]
    expected = post(ours, "/embed", {"inputs": texts, "model": "minilm"})
    client = oa(base_url)

    floats = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    assert floats.model == "minilm" and [d.index for d in floats.data] == [0, 1]
    np.testing.assert_allclose([d.embedding for d in floats.data], expected["embeddings"], atol=1e-6)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == expected["tokens"]

    encoded = client.embeddings.create(model="minilm", input=texts, encoding_format="base64")
    decoded = [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in encoded.data]  # type: ignore[arg-type]
    np.testing.assert_allclose(decoded, expected["embeddings"], atol=1e-6)

    # Without encoding_format the client asks for base64 and decodes it itself.
    default = client.embeddings.create(model="minilm", input=texts[0])
    np.testing.assert_allclose(default.data[0].embedding, expected["embeddings"][0], atol=1e-6)


def test_openai_models_lists_the_catalog(base_url: str) -> None:
    client = oa(base_url)
    models = {m.id: m for m in client.models.list()}
    assert {"minilm", "bert-embed", "marian-en-de"} <= set(models)
    assert models["minilm"].object == "model" and models["minilm"].owned_by == "local"
    assert client.models.retrieve("minilm").id == "minilm"


def test_openai_client_shows_our_message_for_an_unknown_model(base_url: str) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        oa(base_url).embeddings.create(model="no-such-model", input="hello")
    assert "unknown model 'no-such-model'" in str(caught.value)
    assert caught.value.code == "model_not_found"


def test_openai_token_ids_and_other_dimensions_are_refused(base_url: str) -> None:
    client = oa(base_url)
    with pytest.raises(openai.UnprocessableEntityError, match="token ids is not supported"):
        client.embeddings.create(model="minilm", input=[[101, 2023, 102]])
    with pytest.raises(openai.BadRequestError, match="384-dimensional vectors, not 256"):
        client.embeddings.create(model="minilm", input="hello", dimensions=256)
    with pytest.raises(openai.BadRequestError, match="not /embed"):
        client.embeddings.create(model="bert-clf", input="hello")


# -- API keys ---------------------------------------------------------------------------


def test_hf_client_needs_the_api_key_as_its_token(app_factory: Callable[..., FastAPI]) -> None:
    with running(app_factory(api_keys=[KEY])) as url:
        with pytest.raises(HfHubHTTPError) as caught:
            hf(url, "bert-clf").text_classification("hello")
        assert caught.value.response.status_code == 401
        assert hf(url, "bert-clf", token=KEY).text_classification("hello")


def test_openai_client_needs_the_api_key(app_factory: Callable[..., FastAPI]) -> None:
    with running(app_factory(api_keys=[KEY])) as url:
        with pytest.raises(openai.AuthenticationError):
            oa(url, api_key="wrong-key").embeddings.create(model="minilm", input="hello")
        assert oa(url, api_key=KEY).embeddings.create(model="minilm", input="hello").data


# -- docs ---------------------------------------------------------------------------------


def test_compat_routes_document_their_errors_and_examples(base_url: str, ours: httpx.Client) -> None:
    document = ours.get("/openapi.json").json()
    paths, schemas = document["paths"], document["components"]["schemas"]
    # Each catalog model has its own path, with the body and answer of its HF task.
    embed = paths["/models/minilm"]["post"]
    assert {"404", "422", "503"} <= set(embed["responses"])
    body = embed["requestBody"]["content"]["application/json"]
    assert body["example"] == {"inputs": "A man is eating food.", "normalize": True}
    assert schemas[body["schema"]["$ref"].rsplit("/", 1)[1]]["properties"]["dimensions"]["anyOf"][0]["const"] == 384
    classify = paths["/models/bert-clf"]["post"]["responses"]["200"]["content"]["application/json"]
    assert classify["example"][0][0]["label"] == "POSITIVE"
    translate = paths["/models/marian-en-de"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    parameters = schemas[
        schemas[translate["$ref"].rsplit("/", 1)[1]]["properties"]["parameters"]["$ref"].rsplit("/", 1)[1]
    ]
    assert parameters["properties"]["tgt_lang"]["anyOf"][0]["const"] == "de"
    assert "get" in paths["/models/minilm"] and "/models/{name}" not in paths
    embeddings = paths["/v1/embeddings"]["post"]
    not_found = embeddings["responses"]["404"]["content"]["application/json"]["example"]
    assert not_found["error"]["type"] == "model_not_found"
    assert {"401", "404"} <= set(paths["/v1/models/{model}"]["get"]["responses"])


def test_an_openai_error_quoting_a_lone_surrogate_is_a_404_not_a_500(ours: httpx.Client) -> None:
    # Valid JSON, invalid UTF-8 once decoded: the message that quotes it must still be written.
    answer = ours.post(
        "/v1/embeddings", content=b'{"input": "0", "model": "\\ud800"}', headers={"content-type": "application/json"}
    )
    assert answer.status_code == 404
    assert "unknown model" in answer.json()["error"]["message"]
