"""Batching behaviour through HTTP: backpressure, deadlines, disconnects, failure isolation, load."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

import app.batching.batcher as batcher_module
from tests.conftest import core_of, running, serve

pytestmark = pytest.mark.anyio


@contextmanager
def held(app: FastAPI, name: str) -> Iterator[tuple[threading.Event, list[str]]]:
    """Hold model ``name``'s forward passes until the event is set; record the texts it runs.

    The tests that hold a model run it on one lane (``lanes_per_model=1``), so that
    holding its forward pass holds the model and later requests queue.
    """
    slot = core_of(app).registry.slot(name)
    runner = slot.runner
    real = runner.infer
    gate, seen = threading.Event(), []
    slot.entered = threading.Event()

    def infer(payloads: Any, encoded: Any) -> Any:
        slot.entered.set()
        gate.wait(30)
        seen.extend(p.text for p in payloads)
        if any("POISON" in p.text for p in payloads):
            raise RuntimeError("injected failure")
        return real(payloads, encoded)

    runner.infer = infer
    try:
        yield gate, seen
    finally:
        gate.set()
        runner.infer = real


async def start_blocker(app: FastAPI, client: httpx.AsyncClient) -> asyncio.Task[httpx.Response]:
    """A request on bert-clf that is inside its (held) forward pass when this returns."""
    blocker = asyncio.create_task(client.post("/classify", json={"inputs": "hold", "model": "bert-clf"}))
    entered = core_of(app).registry.slot("bert-clf").entered
    assert await asyncio.to_thread(entered.wait, 10)
    return blocker


async def wait_for_queue(app: FastAPI, name: str, depth: int) -> None:
    for _ in range(500):
        if core_of(app).registry.slot(name).batcher.queue_depth >= depth:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"queue of {name} never reached {depth}")


async def test_full_queue_answers_429_with_retry_after(app_factory: Callable[..., FastAPI]) -> None:
    app = app_factory(max_queue_items=4, max_inputs_per_request=4, lanes_per_model=1)
    async with serve(app) as client:
        await client.post("/models/bert-clf/load")
        with held(app, "bert-clf") as (gate, _):
            first = asyncio.create_task(client.post("/classify", json={"inputs": ["a", "b", "c"], "model": "bert-clf"}))
            await wait_for_queue(app, "bert-clf", 3)
            assert await asyncio.to_thread(core_of(app).registry.slot("bert-clf").entered.wait, 10)
            over = await client.post("/classify", json={"inputs": ["d", "e"], "model": "bert-clf"})
            assert over.status_code == 429
            assert int(over.headers["retry-after"]) >= 1
            assert "limit 4" in over.json()["message"]
            gate.set()
            assert (await first).status_code == 200


async def test_deadline_answers_504_and_the_work_is_not_run(app_factory: Callable[..., FastAPI]) -> None:
    app = app_factory(lanes_per_model=1)
    async with serve(app) as client:
        await client.post("/models/bert-clf/load")
        with held(app, "bert-clf") as (gate, seen):
            blocker = await start_blocker(app, client)
            late = await client.post("/classify", json={"inputs": "late", "model": "bert-clf", "timeout_s": 1})
            assert late.status_code == 504
            assert late.json()["error"] == "deadline_exceeded"
            gate.set()
            assert (await blocker).status_code == 200
        assert "late" not in seen


@pytest.mark.faults
async def test_a_disconnecting_client_does_not_disturb_its_neighbours(
    app_factory: Callable[..., FastAPI],
) -> None:
    app = app_factory(lanes_per_model=1)
    async with serve(app) as client:
        await client.post("/models/bert-clf/load")
        expected = (await client.post("/classify", json={"inputs": "neighbour", "model": "bert-clf"})).json()
        with held(app, "bert-clf") as (gate, seen):
            blocker = await start_blocker(app, client)
            leaver = asyncio.create_task(client.post("/classify", json={"inputs": "leaver", "model": "bert-clf"}))
            neighbour = asyncio.create_task(client.post("/classify", json={"inputs": "neighbour", "model": "bert-clf"}))
            await wait_for_queue(app, "bert-clf", 3)
            leaver.cancel()  # the client goes away mid-request
            await asyncio.sleep(0.05)
            gate.set()
            assert (await blocker).status_code == 200
            answer = await neighbour
        assert answer.status_code == 200 and answer.json() == expected
        assert "leaver" not in seen
        batcher = core_of(app).registry.slot("bert-clf").batcher
        for _ in range(100):  # the worker drops the cancelled item on its next pass
            if batcher.queue_depth == 0:
                break
            await asyncio.sleep(0.01)
        assert batcher.queue_depth == 0


async def test_an_injected_failure_fails_only_its_own_request(app_factory: Callable[..., FastAPI]) -> None:
    app = app_factory(lanes_per_model=1)
    async with serve(app) as client:
        await client.post("/models/bert-clf/load")
        texts = [f"text number {i}" for i in range(6)]
        expected = [(await client.post("/classify", json={"inputs": t, "model": "bert-clf"})).json() for t in texts]
        with held(app, "bert-clf") as (gate, _):
            blocker = await start_blocker(app, client)
            good = [
                asyncio.create_task(client.post("/classify", json={"inputs": t, "model": "bert-clf"})) for t in texts
            ]
            bad = asyncio.create_task(client.post("/classify", json={"inputs": "POISON", "model": "bert-clf"}))
            await wait_for_queue(app, "bert-clf", 8)
            gate.set()
            await blocker
            assert [(await g).json() for g in good] == expected
            failed = await bad
        assert failed.status_code == 500
        assert failed.json()["error"] == "inference_failed" and "injected failure" in failed.json()["message"]


@pytest.mark.faults
async def test_a_lane_that_dies_fails_its_requests_with_503_and_the_model_reloads(
    app_factory: Callable[..., FastAPI], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = app_factory(lanes_per_model=1)
    async with serve(app) as client:
        await client.post("/models/bert-clf/load")
        expected = (await client.post("/classify", json={"inputs": "after", "model": "bert-clf"})).json()
        first = core_of(app).registry.slot("bert-clf").batcher
        with held(app, "bert-clf") as (gate, _):
            blocker = await start_blocker(app, client)
            queued = asyncio.create_task(client.post("/classify", json={"inputs": "queued", "model": "bert-clf"}))
            await wait_for_queue(app, "bert-clf", 2)

            def broken(*args: Any, **kwargs: Any) -> Any:
                raise RuntimeError("a bug in batch formation")

            # Not an input's failure (those are isolated): the lane's own code fails, as a bug would.
            monkeypatch.setattr(batcher_module, "form_batch", broken)
            gate.set()
            answers = await asyncio.wait_for(asyncio.gather(blocker, queued), timeout=30)  # nobody hangs
        monkeypatch.undo()
        assert answers[0].status_code == 200  # its forward pass had finished
        assert answers[1].status_code == 503, answers[1].text
        assert "stopped serving (RuntimeError: a bug in batch formation)" in answers[1].json()["message"]
        assert "Retry-After" in answers[1].headers
        slot = core_of(app).registry.slot("bert-clf")
        for _ in range(500):  # the model is reloaded in the background
            if slot.state == "loaded" and slot.batcher is not first:
                break
            await asyncio.sleep(0.02)
        assert slot.loads == 2 and slot.state == "loaded" and first.closed
        again = await client.post("/classify", json={"inputs": "after", "model": "bert-clf"})
        assert again.status_code == 200 and again.json() == expected


async def test_a_thousand_concurrent_mixed_requests_are_all_answered_correctly(
    client: httpx.AsyncClient,
) -> None:
    words = ["the", "a", "small", "big", "red", "green", "cat", "dog", "house", "river", "runs", "sleeps", "today"]
    rng = random.Random(7)
    texts = [" ".join(rng.choices(words, k=rng.randint(2, 12))) for _ in range(40)]
    routes = {
        "/classify": lambda t: {"inputs": t, "model": "bert-clf", "parameters": {"top_k": None}},
        "/embed": lambda t: {"inputs": t, "model": "bert-embed"},
        "/translate": lambda t: {"inputs": t, "model": "marian-en-de"},
        "/summarize": lambda t: {"inputs": t, "model": "t5-sum"},
    }
    reference: dict[tuple[str, str], Any] = {}
    for route, body in routes.items():
        answers = (await client.post(route, json=body(texts) | {"inputs": texts})).json()
        for text, result in zip(texts, answers.get("results") or answers["embeddings"], strict=True):
            reference[(route, text)] = result

    plan = [(rng.choice(list(routes)), rng.choice(texts)) for _ in range(1000)]
    responses = await asyncio.gather(*(client.post(route, json=routes[route](text)) for route, text in plan))
    assert [r.status_code for r in responses] == [200] * 1000
    for (route, text), response in zip(plan, responses, strict=True):
        body = response.json()
        got = (body.get("results") or body["embeddings"])[0]
        expected = reference[(route, text)]
        if route == "/embed":
            assert got == pytest.approx(expected, abs=1e-4)
        elif route == "/classify":
            assert [s["label"] for s in got] == [s["label"] for s in expected]
            assert [s["score"] for s in got] == pytest.approx([s["score"] for s in expected], abs=1e-4)
        else:
            assert got == expected


@pytest.mark.faults
def test_a_client_that_hangs_up_over_a_real_socket_has_its_queued_work_dropped(
    app_factory: Callable[..., FastAPI], caplog: pytest.LogCaptureFixture
) -> None:
    # The route's watcher hears the disconnect from the server and cancels the request.
    app = app_factory(lanes_per_model=1)
    with running(app) as url:
        httpx.post(f"{url}/models/bert-clf/load", timeout=60)
        port = int(url.rsplit(":", 1)[1])
        with held(app, "bert-clf") as (gate, seen):
            blocker = threading.Thread(
                target=httpx.post, args=(f"{url}/classify",), kwargs={"json": {"inputs": "hold", "model": "bert-clf"}}
            )
            blocker.start()
            assert core_of(app).registry.slot("bert-clf").entered.wait(10)
            body = json.dumps({"inputs": "hangs up", "model": "bert-clf"}).encode()
            with socket.create_connection(("127.0.0.1", port)) as raw:
                raw.sendall(
                    b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                batcher = core_of(app).registry.slot("bert-clf").batcher
                for _ in range(500):
                    if batcher.queue_depth == 2:
                        break
                    time.sleep(0.01)
                assert batcher.queue_depth == 2
            # The socket is closed: the server notices the disconnect and cancels the request.
            for _ in range(500):
                if batcher.queue_depth == 1 or core_of(app).registry.slot("bert-clf").in_flight == 1:
                    break
                time.sleep(0.01)
            gate.set()
            blocker.join(30)
            neighbour = httpx.post(f"{url}/classify", json={"inputs": "after", "model": "bert-clf"}, timeout=30)
            metrics = httpx.get(f"{url}/metrics", timeout=30).text
        assert neighbour.status_code == 200
        assert "hangs up" not in seen
        assert batcher.queue_depth == 0
        # A client hanging up is not a server error: 499 in the metrics, no traceback in the log.
        assert 'route="/classify",status="499"} 1.0' in metrics
        assert 'status="500"' not in metrics
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
