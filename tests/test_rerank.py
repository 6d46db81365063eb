"""Rerank, added by the README's steps for a new task: a cross-encoder's scores are its
model's (sigmoid of the logit of each (query, document) pair, as sentence-transformers'
CrossEncoder computes it), an embedder's are the cosine of /embed's vectors; documents come
back best first in TEI's, Cohere's v1/Jina's and Cohere's v2 shapes, within the server's
limits."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml
from sentence_transformers import CrossEncoder

from tests.conftest import serve

pytestmark = pytest.mark.anyio

QUERY = "Where does the train to Paris leave?"
DOCUMENTS = [
    "The train to Paris leaves from platform two before noon.",
    "My garden was green and quiet today.",
    "Scientists reported that the river had flooded three villages.",
    "She asked whether the train would leave after lunch.",
]


def logits(model_dir: Path, query: str, documents: list[str]) -> list[float]:
    """sentence-transformers' CrossEncoder's raw score (its logit) per (query, document) pair."""
    model = CrossEncoder(str(model_dir), device="cpu")
    return model.predict([(query, d) for d in documents], activation_fn=torch.nn.Identity()).tolist()


def sigmoid(model_dir: Path, query: str, documents: list[str]) -> list[float]:
    """Its default score: the sigmoid of a one-label model's logit."""
    return CrossEncoder(str(model_dir), device="cpu").predict([(query, d) for d in documents]).tolist()


def best_first(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: -scores[i])


async def test_tei_rerank_answers_the_cross_encoders_scores_best_first(
    client: httpx.AsyncClient, tiny_models: dict[str, Path]
) -> None:
    raw = logits(tiny_models["bert-rerank"], QUERY, DOCUMENTS)
    r = await client.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS, "return_text": True})
    assert r.status_code == 200, r.text
    ranks = r.json()
    assert [rank["index"] for rank in ranks] == best_first(raw)
    scores = sigmoid(tiny_models["bert-rerank"], QUERY, DOCUMENTS)
    assert [rank["score"] for rank in ranks] == pytest.approx([scores[i] for i in best_first(raw)], abs=1e-5)
    assert [rank["text"] for rank in ranks] == [DOCUMENTS[i] for i in best_first(raw)]
    plain = (await client.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS, "raw_scores": True})).json()
    assert [rank["score"] for rank in plain] == pytest.approx(sorted(raw, reverse=True), abs=1e-5)
    assert all("text" not in rank for rank in plain)


async def test_the_similarity_engine_scores_by_the_cosine_of_embed_vectors(client: httpx.AsyncClient) -> None:
    body = {"query": QUERY, "texts": DOCUMENTS, "model": "minilm-rerank"}
    ranks = (await client.post("/rerank", json=body)).json()
    vectors = (await client.post("/embed", json={"inputs": [QUERY, *DOCUMENTS], "model": "minilm"})).json()
    query, *documents = (torch.tensor(v) for v in vectors["embeddings"])
    cosines = [float(query @ d) for d in documents]
    assert [rank["index"] for rank in ranks] == best_first(cosines)
    assert [rank["score"] for rank in ranks] == pytest.approx(sorted(cosines, reverse=True), abs=1e-4)
    assert ranks[0]["index"] in (0, 3)  # the real MiniLM: the documents about the train


async def test_cohere_v1_and_v2_shapes_with_top_n_and_documents_as_sent(
    client: httpx.AsyncClient, tiny_models: dict[str, Path]
) -> None:
    order = best_first(logits(tiny_models["bert-rerank"], QUERY, DOCUMENTS))
    documents: list[Any] = [DOCUMENTS[0], {"text": DOCUMENTS[1], "id": "b", "tags": ["x"]}, *DOCUMENTS[2:]]
    v1 = await client.post("/v1/rerank", json={"query": QUERY, "documents": documents, "top_n": 2})
    assert v1.status_code == 200, v1.text
    body = v1.json()
    assert [r["index"] for r in body["results"]] == order[:2]
    as_sent = [{"text": d} if isinstance(d, str) else d for d in documents]
    assert [r["document"] for r in body["results"]] == [as_sent[i] for i in order[:2]]  # v1 and Jina: returned
    assert body["model"] == "bert-rerank" and body["meta"]["api_version"]["version"] == "1"
    v2 = (await client.post("/v2/rerank", json={"query": QUERY, "documents": DOCUMENTS, "model": "bert-rerank"})).json()
    assert [r["index"] for r in v2["results"]] == order and all("document" not in r for r in v2["results"])
    scores = [r["relevance_score"] for r in v2["results"]]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)


async def test_equal_scores_keep_the_requests_order(client: httpx.AsyncClient) -> None:
    ranks = (await client.post("/rerank", json={"query": QUERY, "texts": ["same text"] * 5})).json()
    assert [rank["index"] for rank in ranks] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        (
            "/v1/rerank",
            {"query": "q", "documents": ["a"], "rank_fields": ["title"]},
            422,
            "rank_fields is not supported",
        ),
        ("/v1/rerank", {"query": "q", "documents": ["a"], "max_chunks_per_doc": 3}, 422, "max_chunks_per_doc"),
        ("/v2/rerank", {"query": "q", "documents": ["a"], "max_tokens_per_doc": 3}, 422, "max_tokens_per_doc"),
        ("/v1/rerank", {"query": "q", "documents": [{"title": "no text"}]}, 422, "text"),
        ("/rerank", {"query": " ", "texts": ["a"]}, 422, "blank"),
        ("/rerank", {"query": "q", "texts": []}, 422, "texts"),
        ("/rerank", {"query": "q", "texts": ["a"], "model": "bert-clf"}, 400, "bert-rerank"),
        ("/rerank", {"query": "q", "texts": ["a"], "model": "nope"}, 404, "unknown model"),
    ],
)
async def test_bodies_that_cannot_be_ranked_are_refused_saying_what_to_change(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], status: int, message: str
) -> None:
    r = await client.post(path, json=body)
    assert r.status_code == status and message in r.text, r.text


async def test_documents_count_against_the_input_limit_and_pairs_may_refuse_truncation(app_factory: Any) -> None:
    async with serve(app_factory(max_inputs_per_request=3, max_chars_per_input=5000)) as client:
        many = await client.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS})
        assert many.status_code == 413 and "TESSERA_MAX_INPUTS_PER_REQUEST" in many.json()["message"]
        long = await client.post("/rerank", json={"query": "x" * 5001, "texts": ["a"]})
        assert long.status_code == 413 and "TESSERA_MAX_CHARS_PER_INPUT" in long.json()["message"]
        text = "train " * 600  # past the model's 512 tokens, with the query
        cut = await client.post("/rerank", json={"query": QUERY, "texts": [text]})
        assert cut.status_code == 200
        refused = await client.post("/rerank", json={"query": QUERY, "texts": [text], "truncate": False})
        assert refused.status_code == 413 and "truncation was refused" in refused.json()["message"]


async def test_a_requests_pairs_run_through_the_batcher_as_one_batch(client: httpx.AsyncClient) -> None:
    r = await client.post("/rerank", json={"query": QUERY, "texts": [DOCUMENTS[0]] * 16})
    assert r.status_code == 200 and sorted(rank["index"] for rank in r.json()) == list(range(16))
    metrics = (await client.get("/metrics")).text
    count = re.search(r'^tessera_batch_size_count\{[^}]*model="bert-rerank"[^}]*\} (\S+)$', metrics, re.M)
    total = re.search(r'^tessera_batch_size_sum\{[^}]*model="bert-rerank"[^}]*\} (\S+)$', metrics, re.M)
    assert count and total and (float(count[1]), float(total[1])) == (1, 16)


async def test_a_classifier_with_several_labels_is_refused_as_a_reranker_naming_the_fix(
    app_factory: Any, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    catalog = tmp_path / "catalog.yaml"
    entry = {"name": "not-a-reranker", "task": "rerank", "source": {"path": str(tiny_models["bert-clf"])}}
    catalog.write_text(yaml.safe_dump({"models": [entry]}))
    async with serve(app_factory(catalog=catalog)) as client:
        r = await client.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS})
        assert r.status_code == 503, r.text
        assert "one output label" in r.json()["message"] and "engine: similarity" in r.json()["message"]
        listed = (await client.get("/models/not-a-reranker")).json()
        assert listed["state"] == "failed" and "one output label" in listed["error"]
