"""`"stream": true` on /translate and /summarize: Server-Sent Events read with a real SSE
client (httpx-sse), in both process layouts, and the engine clients' streamed infer below.

Until a runner reports its generation step by step, a request hears no delta: these tests
hand the engine deltas themselves (``_Input.delta``, on the engine's loop, while the
forward pass is held), which is what a generating lane calls. The tests that need deltas
from generation itself are in tests/test_streaming_deltas.py.
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
from httpx_sse import ServerSentEvent, aconnect_sse

from app.engine.core import EngineCore
from app.payloads import Generation, GenerationDelta, Seq2SeqInput
from app.service.chunking import Pieces
from app.service.requests import Summary, Translation
from tests.conftest import core_of, held_forward, running, serve

pytestmark = pytest.mark.anyio


async def events_of(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> list[ServerSentEvent]:
    async with aconnect_sse(client, "POST", path, json={**body, "stream": True}) as source:
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        return [event async for event in source.aiter_sse()]


async def first_event_then_leave(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> ServerSentEvent:
    async with aconnect_sse(client, "POST", path, json=body) as source:
        return await anext(source.aiter_sse())  # then the connection closes, mid-stream


def shapes(events: list[ServerSentEvent]) -> list[tuple[str, dict[str, Any]]]:
    return [(event.event, json.loads(event.data)) for event in events]


async def until(condition: Callable[[], bool], what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.005)


def on_engine_loop(core: EngineCore, work: Callable[[], None]) -> None:
    """``work`` on the engine's event loop thread, as a lane reports (either layout)."""
    core.loop.call_soon_threadsafe(work)


def send_deltas(core: EngineCore, pieces: list[tuple[int, str, int]]) -> None:
    """Deltas (input, text, tokens) for the engine's newest request in flight, as a
    generating lane sends them."""

    def deliver() -> None:
        request = list(core._requests.values())[-1]
        for index, text, tokens in pieces:
            request.inputs[index].delta(GenerationDelta(text, tokens))

    on_engine_loop(core, deliver)


async def test_a_streamed_translation_ends_with_each_inputs_final_text_then_done(client: httpx.AsyncClient) -> None:
    body = {"inputs": ["hello world", "good morning"], "model": "marian-en-de"}
    plain = await client.post("/translate", json=body)
    assert plain.status_code == 200, plain.text
    events = shapes(await events_of(client, "/translate", body))
    assert events[-1] == ("done", {"model": "marian-en-de"})
    finals = {data["index"]: data for kind, data in events if kind == "final"}
    assert finals == {
        i: {"index": i, "text": r["translation_text"], "truncated": False, "chunks": 1}
        for i, r in enumerate(plain.json()["results"])
    }
    assert {kind for kind, _ in events} <= {"delta", "final", "done"}


async def test_streamed_summaries_abstractive_chunked_and_extractive(client: httpx.AsyncClient) -> None:
    sentence = "The council met on Tuesday to discuss the new transit plan for the city. "
    for body in (
        {"inputs": ["the big dog ran over the green hill", "a cat sat"], "model": "bart-sum"},
        {"inputs": sentence * 40, "parameters": {"long_input": "chunk"}},
        {"inputs": sentence * 3, "model": "minilm-extractive", "parameters": {"max_sentences": 1}},
    ):
        plain = await client.post("/summarize", json=body)
        assert plain.status_code == 200, plain.text
        events = shapes(await events_of(client, "/summarize", body))
        finals = sorted((data for kind, data in events if kind == "final"), key=lambda f: f["index"])
        expected = plain.json()["results"]
        assert [f["index"] for f in finals] == list(range(len(expected)))  # each input's once, as it settles
        assert [
            {"summary_text": f["text"], "truncated": f["truncated"], "chunks": f["chunks"]} for f in finals
        ] == expected
        assert events[-1] == ("done", {"model": plain.json()["model"]})
        if body.get("model") == "minilm-extractive":
            assert [kind for kind, _ in events] == ["final", "done"]  # extractive: no deltas


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({"inputs": "x", "model": "no-such-model"}, 404, "model_not_found"),
        ({"inputs": "x", "model": "bert-clf"}, 400, "wrong_task"),
        ({"inputs": "x", "parameters": {"num_beams": 64}}, 422, "invalid_input"),
        ({"inputs": "x", "stream": "yes"}, 422, "invalid_input"),
    ],
)
async def test_errors_before_a_stream_begins_keep_their_status_and_json_body(
    client: httpx.AsyncClient, body: dict[str, Any], status: int, error: str
) -> None:
    r = await client.post("/translate", json={"stream": True, **body})
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"] == error and r.json()["request_id"] == r.headers["x-request-id"]


async def test_a_deadline_passed_before_any_event_is_a_504_not_a_stream(app_factory: Callable[..., FastAPI]) -> None:
    app = app_factory(lanes_per_model=1)
    async with serve(app) as client:
        assert (await client.post("/models/marian-en-de/load")).status_code == 200
        with held_forward(core_of(app), "marian-en-de"):
            r = await client.post("/translate", json={"inputs": "hi", "timeout_s": 1, "stream": True})
        assert r.status_code == 504, r.text
        assert r.json()["error"] == "deadline_exceeded"


async def test_deltas_go_out_as_the_engine_hears_them_each_before_its_inputs_final(
    app_factory: Callable[..., FastAPI],
) -> None:
    app = app_factory(lanes_per_model=1)
    async with serve(app) as client:
        assert (await client.post("/models/marian-en-de/load")).status_code == 200
        core = core_of(app)
        body = {"inputs": ["hello world", "good morning"], "model": "marian-en-de"}
        with held_forward(core, "marian-en-de") as (gate, entered, _):
            streamed = asyncio.create_task(events_of(client, "/translate", body))
            assert await asyncio.to_thread(entered.wait, 30)
            send_deltas(core, [(1, "Guten", 1), (0, "Hallo", 2), (1, " Morgen", 3)])
            await asyncio.sleep(0.2)  # the deltas reach the front before the results
            gate.set()
            events = shapes(await streamed)
        deltas = [data for kind, data in events if kind == "delta"]
        # The injected deltas first, in the order the engine sent them; the model's own follow.
        assert deltas[:3] == [
            {"index": 1, "text": "Guten", "tokens": 1},
            {"index": 0, "text": "Hallo", "tokens": 2},
            {"index": 1, "text": " Morgen", "tokens": 3},
        ]
        kinds = [kind for kind, _ in events]
        assert kinds[:3] == ["delta"] * 3 and kinds.count("final") == 2 and kinds[-1] == "done"


async def test_an_error_once_the_stream_began_is_an_error_event_that_ends_it(
    app_factory: Callable[..., FastAPI],
) -> None:
    app = app_factory(lanes_per_model=1)
    async with serve(app) as client:
        assert (await client.post("/models/marian-en-de/load")).status_code == 200
        core = core_of(app)
        with held_forward(core, "marian-en-de") as (gate, entered, _):
            # held_forward fails a batch with POISON in it: a fault of the model, mid-generation.
            streamed = asyncio.create_task(events_of(client, "/translate", {"inputs": "POISON here"}))
            assert await asyncio.to_thread(entered.wait, 30)
            send_deltas(core, [(0, "Gift", 1)])
            await asyncio.sleep(0.2)
            gate.set()
            events = await streamed
        assert [e.event for e in events] == ["delta", "error"]
        error = json.loads(events[-1].data)
        assert error["error"] == "inference_failed" and "injected failure" in error["message"]
        assert set(error) == {"error", "message", "request_id"}


async def test_a_streaming_client_that_leaves_has_its_request_cancelled_in_the_engine(
    app_factory: Callable[..., FastAPI],
) -> None:
    app = app_factory(lanes_per_model=1)
    with running(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            assert (await client.post("/models/marian-en-de/load")).status_code == 200
            core = core_of(app)
            slot = core.registry.slot("marian-en-de")
            batcher = slot.batcher
            assert batcher is not None
            body = {"inputs": ["Leaver one", "Leaver two"], "model": "marian-en-de", "stream": True}
            with held_forward(core, "marian-en-de") as (gate, entered, _):
                blocker = asyncio.create_task(client.post("/translate", json={"inputs": "hold the lane"}))
                assert await asyncio.to_thread(entered.wait, 30)
                reader = asyncio.create_task(first_event_then_leave(client, "/translate", body))
                await until(lambda: batcher.queue_depth >= 3, "the streamed request's inputs queued")
                send_deltas(core, [(0, "Ver", 1)])
                first = await reader
                assert (first.event, json.loads(first.data)["text"]) == ("delta", "Ver")
                # The client has gone, the lane is still held: the engine let the request go.
                await until(lambda: batcher.queue_depth == 1, "the leaver's inputs dropped")
                await until(lambda: len(core._requests) == 1, "the engine forgot the leaver")
                gate.set()
                assert (await blocker).status_code == 200
            await until(lambda: slot.in_flight == 0 and batcher.queue_depth == 0, "the engine holds nothing")


async def test_the_engine_clients_hear_deltas_and_results_before_infer_returns(
    app_factory: Callable[..., FastAPI],
) -> None:
    app = app_factory(lanes_per_model=1)
    async with serve(app):
        models = app.state.registry  # the engine client: in-process, or a front's over ZeroMQ
        await models.get_or_load("marian-en-de")
        core = core_of(app)
        heard: list[tuple[str, int, Any]] = []
        payloads = [Seq2SeqInput("hello"), Seq2SeqInput("good day")]
        with held_forward(core, "marian-en-de") as (gate, entered, _):
            infer = asyncio.create_task(
                models.infer(
                    "marian-en-de",
                    payloads,
                    timeout_s=60,
                    on_delta=lambda i, piece: heard.append(("delta", i, piece)),
                    on_result=lambda i, result: heard.append(("result", i, result)),
                )
            )
            assert await asyncio.to_thread(entered.wait, 30)
            send_deltas(core, [(0, "Hal", 1), (1, "Gu", 1), (0, "lo", 2)])
            await until(lambda: len(heard) == 3, "the deltas heard")
            gate.set()
            results = await infer
        assert heard[:3] == [
            ("delta", 0, GenerationDelta("Hal", 1)),
            ("delta", 1, GenerationDelta("Gu", 1)),
            ("delta", 0, GenerationDelta("lo", 2)),
        ]
        # Then the model's own deltas, and each input's result once.
        finals = sorted(((i, r) for kind, i, r in heard[3:] if kind == "result"), key=lambda pair: pair[0])
        assert finals == [(0, results[0]), (1, results[1])]
        assert all(isinstance(r, Generation) for r in results)
        # Unstreamed, the same request hears nothing (and the engine sends nothing but Done).
        assert len(await models.infer("marian-en-de", payloads, timeout_s=60)) == 2


class Heard:
    """A Progress that records what it hears."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, Any]] = []

    def delta(self, index: int, piece: GenerationDelta) -> None:
        self.events.append(("delta", index, (piece.text, piece.tokens)))

    def final(self, index: int, result: Translation | Summary) -> None:
        self.events.append(("final", index, result.text))


def test_a_chunked_inputs_deltas_go_out_in_document_order_whatever_order_they_come_in() -> None:
    # Text 0: three pieces, "\n" between them, "\n\n" after; text 1: one piece.
    pieces = Pieces([(["a", "b", "c"], ["", "\n", "\n", "\n\n"]), (["x"], ["", ""])])
    heard = Heard()
    order = pieces.in_order(heard)
    order.delta(2, GenerationDelta("C1", 1))  # piece c, ahead of its turn: held
    order.delta(1, GenerationDelta("B1", 1))  # piece b: held
    order.delta(3, GenerationDelta("X1", 1))  # text 1's only piece: out at once
    order.delta(0, GenerationDelta("A1", 2))  # piece a: current, out at once
    order.result(2, Generation("C1"))  # complete, still not its turn
    order.delta(1, GenerationDelta("B2", 2))
    order.result(0, Generation("A1"))  # a complete: b's held deltas go out
    order.result(3, Generation("X1"))
    order.result(1, Generation("B1B2"))  # b complete: c's held delta, then text 0's final
    assert heard.events == [
        ("delta", 1, ("X1", 1)),
        ("delta", 0, ("A1", 2)),
        ("delta", 0, ("\nB1", 3)),
        ("delta", 0, ("B2", 4)),
        ("final", 1, "X1"),
        ("delta", 0, ("\nC1", 5)),
        ("delta", 0, ("\n\n", 5)),
        ("final", 0, "A1\nB1B2\nC1\n\n"),
    ]
    # What the deltas of text 0 add up to is its final text.
    assert "".join(e[2][0] for e in heard.events if e[:2] == ("delta", 0)) == "A1\nB1B2\nC1\n\n"
