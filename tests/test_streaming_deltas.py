"""Streamed answers whose deltas come from generation itself: the continuous batcher's
running batch reports each input's settled text step by step (``outcome.delta`` on the
engine's loop), and every route, layout and chunking mode shows it to the client in order.

The plumbing under them (engine events, clients, SSE, ordering, cancellation) is tested
with injected deltas in tests/test_streaming.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from httpx_sse import aconnect_sse

from tests.conftest import core_of, running
from tests.test_generation import document_with_paragraphs, line_shape
from tests.test_streaming import events_of, shapes

pytestmark = pytest.mark.anyio

FORCED = {"max_new_tokens": 8, "min_length": 8}  # every input generates its 8 tokens


def by_input(events: list[tuple[str, dict[str, Any]]]) -> dict[int, list[tuple[str, dict[str, Any]]]]:
    per: dict[int, list[tuple[str, dict[str, Any]]]] = {}
    for kind, data in events:
        if kind in ("delta", "final"):
            per.setdefault(data["index"], []).append((kind, data))
    return per


def assert_deltas_then_final(events: list[tuple[str, dict[str, Any]]], inputs: int) -> None:
    """Each input: at least one delta, its tokens growing, then its final, which the deltas
    add up to (but for the whitespace the final text strips)."""
    per = by_input(events)
    assert sorted(per) == list(range(inputs))
    for index, own in per.items():
        kinds = [kind for kind, _ in own]
        assert kinds[-1] == "final" and kinds.count("final") == 1, (index, kinds)
        deltas = [data for kind, data in own if kind == "delta"]
        assert deltas, f"input {index} had no delta before its final"
        tokens = [d["tokens"] for d in deltas]
        assert tokens == sorted(tokens) and tokens[-1] >= 1
        assert "".join(d["text"] for d in deltas).strip() == own[-1][1]["text"]


async def test_a_streamed_translation_sends_deltas_before_each_inputs_final(client: httpx.AsyncClient) -> None:
    body = {"inputs": ["hello world", "the small cat is on the big red mat"], "parameters": FORCED}
    events = shapes(await events_of(client, "/translate", body))
    assert_deltas_then_final(events, 2)
    assert events[-1] == ("done", {"model": "marian-en-de"})


async def test_a_streamed_summary_sends_deltas_before_its_final(client: httpx.AsyncClient) -> None:
    # T5: the tiny BART's random bytes decode to partial characters, which wait for the final.
    body = {"inputs": ["the big dog ran over the green hill"], "model": "t5-sum", "parameters": FORCED}
    events = shapes(await events_of(client, "/summarize", body))
    assert_deltas_then_final(events, 1)


async def test_a_chunked_translation_streams_each_inputs_text_in_document_order(client: httpx.AsyncClient) -> None:
    document = document_with_paragraphs()
    body = {"inputs": [document, "hello world"], "parameters": {**FORCED, "long_input": "chunk"}}
    events = shapes(await events_of(client, "/translate", body))
    per = by_input(events)
    for own in per.values():
        final = own[-1][1]
        joined = "".join(data["text"] for kind, data in own if kind == "delta")
        assert joined.split() == final["text"].split()  # every piece's text, in document order
    document_final = per[0][-1][1]
    assert document_final["chunks"] > 1
    joined = "".join(data["text"] for kind, data in per[0] if kind == "delta")
    assert line_shape(joined.strip("\n")) == line_shape(document.strip("\n"))  # its lines, as they came


async def test_a_streaming_client_that_leaves_mid_generation_stops_it(app_factory: Callable[..., FastAPI]) -> None:
    app = app_factory(lanes_per_model=1)
    body = {"inputs": "hello there", "parameters": {"max_new_tokens": 400, "min_length": 400}, "stream": True}
    with running(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            assert (await client.post("/models/marian-en-de/load")).status_code == 200
            slot = core_of(app).registry.slot("marian-en-de")
            runner = slot.runner
            assert runner is not None
            steps: list[int] = []
            hook = runner.model.get_decoder().register_forward_hook(lambda *_: steps.append(1))
            try:
                async with aconnect_sse(client, "POST", "/translate", json=body) as source:
                    first = await anext(source.aiter_sse())
                    assert first.event == "delta", first
                deadline = time.monotonic() + 30
                while slot.in_flight:
                    assert time.monotonic() < deadline, "the engine never let the request go"
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.5)
                assert len(steps) < 400  # generation stopped: it did not run to its 400 tokens
            finally:
                hook.remove()
    assert json.loads(first.data)["index"] == 0
