"""A client that leaves costs nothing more, on every route and in both process layouts: its
queued inputs are dropped at once, and its rows of a running generation stop at the next
step. The tests count what the model computed after the hang-up, not how long it took."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from fastapi import FastAPI

from tests.conftest import core_of, held_forward, serve

pytestmark = pytest.mark.anyio

MARK = "Leaver"  # in every text of the request that leaves; no other request's text has it
SENTENCES = " ".join(f"{MARK} wrote sentence number {i} about the weather." for i in range(60))

# (route, the leaving request's body, its model, how many inputs it queues at least)
ROUTES = [
    ("/classify", {"inputs": [f"{MARK} one", f"{MARK} two", f"{MARK} three"], "model": "bert-clf"}, "bert-clf", 3),
    (
        "/classify",
        {"inputs": [f"{MARK} plays"] * 2, "model": "nli", "parameters": {"candidate_labels": ["sport", "art"]}},
        "nli",
        2,
    ),
    ("/embed", {"inputs": [f"{MARK} a", f"{MARK} b"], "model": "bert-embed"}, "bert-embed", 2),
    ("/fill-mask", {"inputs": [f"{MARK} is the [MASK]."] * 2, "model": "bert-fill"}, "bert-fill", 2),
    ("/translate", {"inputs": [f"{MARK} says hello", f"{MARK} again"], "model": "marian-en-de"}, "marian-en-de", 2),
    ("/summarize", {"inputs": [f"{MARK} writes.", f"{MARK} reads."], "model": "bart-sum"}, "bart-sum", 2),
    (
        "/summarize",
        {"inputs": SENTENCES, "model": "bart-sum", "parameters": {"long_input": "chunk"}},
        "bart-sum",
        2,
    ),
    ("/summarize", {"inputs": [SENTENCES[:400]] * 2, "model": "minilm-extractive"}, "minilm-extractive", 2),
    ("/models/bert-clf", {"inputs": [f"{MARK} hf one", f"{MARK} hf two"]}, "bert-clf", 2),
    ("/v1/embeddings", {"input": [f"{MARK} x", f"{MARK} y"], "model": "bert-embed"}, "bert-embed", 2),
    ("/rerank", {"query": f"{MARK} asks", "texts": ["one", "two", "three"], "model": "bert-rerank"}, "bert-rerank", 3),
    ("/v1/rerank", {"query": f"{MARK} asks", "documents": ["a", "b"], "model": "minilm-rerank"}, "minilm-rerank", 2),
    ("/token-classification", {"inputs": [f"{MARK} one", f"{MARK} two"], "model": "bert-ner"}, "bert-ner", 2),
]

ROUTE_IDS = [
    "classify",
    "zero-shot",
    "embed",
    "fill-mask",
    "translate",
    "summarize",
    "summarize-chunked",
    "summarize-extractive",
    "hf",
    "openai",
    "rerank",
    "rerank-cohere",
    "token-classification",
]


def holding(body: dict[str, Any], text: str) -> dict[str, Any]:
    """The fields that make ``body`` a one-text request of ``text``."""
    for documents in ("texts", "documents"):  # a rerank body: one pair
        if documents in body:
            return {"query": text, documents: [text]}
    return {"input": text} if "input" in body else {"inputs": text}


async def until(condition: Callable[[], bool], what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.005)


@pytest.mark.parametrize(("path", "body", "model", "queued"), ROUTES, ids=ROUTE_IDS)
async def test_a_client_that_leaves_has_its_queued_inputs_dropped_at_once_and_never_computed(
    app_factory: Callable[..., FastAPI], path: str, body: dict[str, Any], model: str, queued: int
) -> None:
    app = app_factory(lanes_per_model=1)
    async with serve(app) as client:
        assert (await client.post(f"/models/{model}/load")).status_code == 200
        slot = core_of(app).registry.slot(model)
        batcher = slot.batcher
        assert batcher is not None
        with held_forward(core_of(app), model) as (gate, entered, computed):
            # The same route, one short text: it holds the lane while the leaver's inputs queue.
            text = "hold the [MASK] here."  # fill-mask needs its mask; the others read it as text
            hold = {**body, **holding(body, text)}
            blocker = asyncio.create_task(client.post(path, json=hold))
            assert await asyncio.to_thread(entered.wait, 20)
            leaver = asyncio.create_task(client.post(path, json=body))
            await until(lambda: batcher.queue_depth >= 1 + queued, "the leaver's inputs queued")
            leaver.cancel()  # the client goes away
            # At once: only the blocker's input is left, the one the lane is running.
            await until(lambda: batcher.queue_depth == 1, "the leaver's inputs dropped", seconds=5)
            gate.set()
            assert (await blocker).status_code == 200
            after = (await client.post(path, json=hold)).status_code
        assert after == 200  # the model serves on
        assert not [text for text in computed if MARK in text]  # nothing of the leaver's was computed
        await until(lambda: batcher.queue_depth == 0 and slot.in_flight == 0, "the engine holds nothing")


async def test_a_generation_whose_client_leaves_stops_at_the_next_step(app_factory: Callable[..., FastAPI]) -> None:
    app = app_factory(lanes_per_model=1)
    async with serve(app) as client:
        assert (await client.post("/models/marian-en-de/load")).status_code == 200
        slot = core_of(app).registry.slot("marian-en-de")
        runner = slot.runner
        assert runner is not None
        steps: list[int] = []
        third, release = threading.Event(), threading.Event()

        def step(module: Any, args: Any, output: Any) -> None:
            steps.append(1)
            if len(steps) == 3:
                third.set()
                release.wait(30)

        hook = runner.model.get_decoder().register_forward_hook(step)
        try:
            body = {
                "inputs": [f"{MARK} one", f"{MARK} two"],
                "model": "marian-en-de",
                "parameters": {"max_new_tokens": 60, "min_length": 60},
            }
            leaver = asyncio.create_task(client.post("/translate", json=body))
            assert await asyncio.to_thread(third.wait, 30)
            leaver.cancel()  # the client goes away three steps into 60
            await until(lambda: slot.in_flight == 0, "the engine let the request go")
            release.set()
            after = await client.post("/translate", json={"inputs": "next", "model": "marian-en-de"})
            assert after.status_code == 200  # the lane is free: the generation ended
        finally:
            release.set()
            hook.remove()
        # Three steps, then at most one more before the stopping check; the next request's
        # own steps (at most the entry's 8 new tokens) come after.
        assert len(steps) <= 4 + 8, len(steps)
