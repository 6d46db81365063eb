"""Front processes and an engine (app/engine): what a client sees through a front is what the
one-process server answers, and what the batcher guarantees holds across the boundary.

The engine runs here in a thread with its own event loop (the code ``python -m app engine``
runs), fronts are apps made by create_app with ``engine=``; the last tests run the real
processes (``TESSERA_WORKERS``) under the supervisor."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

import app.engine.core as core_module
import app.engine.zmq_client as client_module
from app import config
from app.config import Settings
from app.engine.core import EngineCore
from app.errors import InvalidInput
from app.main import Front, create_app
from app.payloads import ClassifyInput
from tests.conftest import engine_thread, held_forward, serve, server_process

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def front(settings: Settings, core: EngineCore, name: str = "front-0") -> AsyncIterator[httpx.AsyncClient]:
    async with serve(create_app(settings, engine=Front(core.address, name))) as client:
        yield client


async def until(condition: Callable[[], bool], what: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never: {what}")
        await asyncio.sleep(0.01)


BODIES = [
    ("/classify", {"inputs": ["I loved it", "dreadful"], "model": "bert-clf", "parameters": {"top_k": None}}),
    ("/classify", {"inputs": "a match", "model": "nli", "parameters": {"candidate_labels": ["sport", "art"]}}),
    ("/embed", {"inputs": ["one", "two words"], "model": "bert-embed"}),
    ("/translate", {"inputs": "hello there", "model": "marian-en-de"}),
    ("/fill-mask", {"inputs": "Paris is the [MASK] of France.", "model": "bert-fill"}),
    ("/summarize", {"inputs": "One sentence. " * 300, "model": "bart-sum", "parameters": {"long_input": "chunk"}}),
    ("/classify", {"inputs": "x", "model": "no-such-model"}),
]


async def test_a_front_answers_what_the_one_process_server_answers(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings()
    async with serve(create_app(settings)) as alone:
        expected = [(await alone.post(path, json=body)) for path, body in BODIES]
    with engine_thread(settings, tmp_path) as core:
        async with front(settings, core) as client:
            for (path, body), want in zip(BODIES, expected, strict=True):
                got = await client.post(path, json=body)
                assert got.status_code == want.status_code, (path, got.text)
                assert got.json().keys() == want.json().keys()
                assert _rounded(got.json()) == _rounded(want.json()), path
            models = (await client.get("/models")).json()["models"]
            assert {m["name"]: m["state"] for m in models}["bert-clf"] == "loaded"  # the engine's state, mirrored
        assert core.registry.slot("bert-clf").in_flight == 0


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items() if k != "request_id"}
    return value


async def test_deadlines_disconnects_and_full_queues_hold_across_the_boundary(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    # The leaver's and the late input are dropped at once: the blocker and 3 more fill 4.
    settings = make_settings(lanes_per_model=1, max_queue_items=4, max_inputs_per_request=4)
    with engine_thread(settings, tmp_path) as core:
        async with front(settings, core) as client:
            assert (await client.post("/models/bert-clf/load")).status_code == 200
            slot = core.registry.slot("bert-clf")
            with held_forward(core, "bert-clf") as (gate, entered, seen):
                blocker = asyncio.create_task(client.post("/classify", json={"inputs": "hold", "model": "bert-clf"}))
                assert await asyncio.to_thread(entered.wait, 10)
                leaver = asyncio.create_task(client.post("/classify", json={"inputs": "leaver", "model": "bert-clf"}))
                await until(lambda: slot.queue_depth == 2, "the leaver queued")
                leaver.cancel()  # the client goes away: the engine drops its input
                await until(lambda: slot.in_flight == 1, "the engine let the leaver go")
                assert slot.queue_depth == 1  # at once, not when the lane comes to it

                late = await client.post("/classify", json={"inputs": "late", "model": "bert-clf", "timeout_s": 1})
                assert late.status_code == 504 and late.json()["error"] == "deadline_exceeded"
                assert not blocker.done()  # answered at its deadline, while the only lane is still held
                await until(lambda: slot.queue_depth == 1, "the late input dropped")

                queued = asyncio.create_task(
                    client.post("/classify", json={"inputs": ["a", "b", "c"], "model": "bert-clf"})
                )
                await until(lambda: slot.queue_depth == 4, "three more queued")
                described = (await client.get("/models/bert-clf")).json()
                assert described["queue_depth"] == 4  # the engine's depth now, not a heartbeat ago
                over = await client.post("/classify", json={"inputs": ["d", "e"], "model": "bert-clf"})
                assert over.status_code == 429 and int(over.headers["retry-after"]) >= 1
                assert "limit 4" in over.json()["message"]

                gate.set()
                assert (await blocker).status_code == 200
                assert (await queued).status_code == 200
            assert "leaver" not in seen and "late" not in seen
            await until(lambda: slot.queue_depth == 0 and slot.in_flight == 0, "the engine holds nothing")


async def test_one_failing_input_fails_alone_through_a_front(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(lanes_per_model=1)
    with engine_thread(settings, tmp_path) as core:
        async with front(settings, core) as client:
            await client.post("/models/bert-clf/load")
            with held_forward(core, "bert-clf") as (gate, entered, _):
                blocker = asyncio.create_task(client.post("/classify", json={"inputs": "hold", "model": "bert-clf"}))
                assert await asyncio.to_thread(entered.wait, 10)
                poisoned = asyncio.create_task(client.post("/classify", json={"inputs": "POISON", "model": "bert-clf"}))
                fine = asyncio.create_task(client.post("/classify", json={"inputs": "fine", "model": "bert-clf"}))
                await until(lambda: core.registry.slot("bert-clf").queue_depth == 3, "both queued")
                gate.set()
                assert (await blocker).status_code == 200
                assert (await fine).status_code == 200  # it shared a batch with the poisoned input
                failed = await poisoned
            assert failed.status_code == 500 and failed.json()["error"] == "inference_failed"
            assert "injected failure" in failed.json()["message"]


async def test_a_request_the_wire_cannot_carry_fails_alone_and_not_its_frame(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings()
    with engine_thread(settings, tmp_path) as core:
        app = create_app(settings, engine=Front(core.address, "front-0"))
        async with serve(app) as client:
            assert (await client.post("/models/bert-clf/load")).status_code == 200
            models = app.state.registry
            # Both in one turn of the loop: one frame to the engine, were they encoded together
            # (then both were lost: neither would ever answer).
            async with asyncio.timeout(30):
                huge, fine = await asyncio.gather(
                    models.infer("bert-clf", [ClassifyInput("a film", 2**70, None)], timeout_s=10),
                    models.infer("bert-clf", [ClassifyInput("a film", 1, None)], timeout_s=10),
                    return_exceptions=True,
                )
            assert isinstance(huge, InvalidInput) and "cannot pass on" in huge.message
            assert not isinstance(fine, BaseException) and len(fine[0].labels) == 1
            # Over HTTP such a number never gets that far: the API's bounds answer 422.
            answer = await client.post("/classify", json={"inputs": "a film", "model": "bert-clf", "top_k": 2**70})
            assert answer.status_code == 422 and "top_k" in answer.text


async def test_every_process_is_in_metrics_and_the_rate_limit_is_one_per_tenant(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(
        api_keys="k1,k2", rate_limit_inputs_per_s=0.5, rate_limit_burst=4, max_inputs_per_request=4
    )
    k1 = {"Authorization": "Bearer k1"}
    with engine_thread(settings, tmp_path) as core:
        async with front(settings, core, "front-0") as one, front(settings, core, "front-1") as two:
            body = {"inputs": ["a", "b", "c"], "model": "bert-clf"}
            assert (await one.post("/classify", json=body, headers=k1)).status_code == 200
            refused = await two.post("/classify", json={"inputs": ["d", "e"], "model": "bert-clf"}, headers=k1)
            assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1  # the same bucket
            other = await two.post("/classify", json=body, headers={"Authorization": "Bearer k2"})
            assert other.status_code == 200  # another tenant's own

            text = (await one.get("/metrics", headers=k1)).text
    assert 'tessera_requests_total{process="front-0",model="bert-clf",route="/classify",status="200"} 1.0' in text
    assert 'tessera_requests_total{process="front-1",model="",route="/classify",status="429"} 1.0' in text
    assert 'tessera_batch_size_count{process="engine",model="bert-clf"}' in text
    assert 'tessera_model_loaded{process="engine",device="cpu",model="bert-clf"} 1.0' in text
    assert text.count("# TYPE tessera_requests_total counter") == 1


async def test_models_load_and_unload_through_a_front(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    settings = make_settings()
    with engine_thread(settings, tmp_path) as core:
        async with front(settings, core) as client:
            loaded = await client.post("/models/bert-embed/load")
            assert loaded.status_code == 200 and loaded.json()["state"] == "loaded"
            assert core.registry.slot("bert-embed").state == "loaded"
            broken = await client.post("/models/broken/load")
            assert broken.status_code == 503 and "failed to load" in broken.json()["message"]
            unloaded = await client.post("/models/bert-embed/unload")
            assert unloaded.status_code == 200 and unloaded.json()["state"] == "not_loaded"
            assert core.registry.slot("bert-embed").state == "not_loaded"


async def test_a_front_whose_engine_is_gone_fails_fast_and_is_not_ready(
    make_settings: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "ENGINE_SILENT_S", 1.5)
    settings = make_settings(lanes_per_model=1)
    with engine_thread(settings, tmp_path) as core:
        app = create_app(settings, engine=Front(core.address, "front-0"))
        async with serve(app) as client:
            await client.post("/models/bert-clf/load")
            assert (await client.get("/health/ready")).status_code == 200
            with held_forward(core, "bert-clf") as (gate, entered, _):
                waiting = asyncio.create_task(client.post("/classify", json={"inputs": "x", "model": "bert-clf"}))
                assert await asyncio.to_thread(entered.wait, 10)
                # The engine stops answering (as a killed process would).
                stopped = asyncio.run_coroutine_threadsafe(core.server.close(), core.thread_loop)  # type: ignore[attr-defined]
                await asyncio.wrap_future(stopped)
                answer = await asyncio.wait_for(waiting, 10)
                assert answer.status_code == 503 and answer.json()["error"] == "model_unavailable"
                ready = await client.get("/health/ready")
                assert ready.status_code == 503 and ready.json()["status"] == "no_engine"
                gate.set()


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


def test_workers_serve_on_one_port_without_torch_restart_a_dead_front_and_drain_fronts_before_the_engine(
    catalog_path: Path,
) -> None:
    env = {"TESSERA_CATALOG": str(catalog_path), "TESSERA_WORKERS": "2", "TESSERA_HUB": "offline"}
    with server_process(env) as server:
        supervisor = server.process.pid
        for _ in range(300):
            if httpx.get(f"{server.url}/health/ready", timeout=5).status_code == 200:
                break
            time.sleep(0.1)
        with httpx.Client(base_url=server.url, timeout=60) as http:
            assert http.post("/classify", json={"inputs": "hi", "model": "bert-clf"}).status_code == 200
        # Fresh connections spread over both fronts (SO_REUSEPORT).
        for _ in range(40):
            assert httpx.post(f"{server.url}/classify", json={"inputs": "hi", "model": "bert-clf"}).status_code == 200
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'process="front-0",model="bert-clf",route="/classify"' in metrics
        assert 'process="front-1",model="bert-clf",route="/classify"' in metrics

        children = _children(supervisor)
        assert len(children) == 3  # the engine and two fronts
        fronts = [p for p in children if b"front" in Path(f"/proc/{p}/cmdline").read_bytes()]
        [engine] = set(children) - set(fronts)
        # Only the engine runs models: a front that has served requests has not loaded torch.
        assert "libtorch" in Path(f"/proc/{engine}/maps").read_text()
        assert all("libtorch" not in Path(f"/proc/{front}/maps").read_text() for front in fronts)
        os.kill(fronts[0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not (len(_children(supervisor)) == 3 and fronts[0] not in _children(supervisor)):
            assert time.monotonic() < deadline, server.output()[-3000:]
            time.sleep(0.2)

        # A long request in flight when SIGTERM comes finishes; then everything stops, status 0.
        long = {"inputs": ["Many words here. " * 40] * 16, "model": "marian-en-de"}
        result: list[httpx.Response] = []
        sender = threading.Thread(
            target=lambda: result.append(httpx.post(f"{server.url}/translate", json=long, timeout=120))
        )
        sender.start()
        time.sleep(0.5)
        server.process.send_signal(signal.SIGTERM)
        sender.join(120)
        assert server.process.wait(120) == 0, server.output()[-3000:]
        assert result and result[0].status_code == 200, server.output()[-3000:]
        log = server.output()
        assert log.index("engine: stopping") > log.rindex("Finished server process")
        for pid in children:
            assert not Path(f"/proc/{pid}").exists() or b"Z" in Path(f"/proc/{pid}/stat").read_bytes().split()[2]


def test_the_default_front_count_follows_the_cores_a_container_may_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(config, "CGROUP_CPU_MAX", cpu_max)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert Settings().front_processes == 4  # no cgroup file: the affinity's 16 cores
    cpu_max.write_text("max 100000\n")
    assert Settings().front_processes == 4
    cpu_max.write_text("200000 100000\n")  # a limit of 2 CPUs on a 16-core node
    assert Settings().front_processes == 1
    cpu_max.write_text("50000 100000\n")  # half a CPU: one process does everything
    assert Settings().front_processes == 0
    assert Settings(workers=3).front_processes == 3


async def test_finished_requests_do_not_pile_up_in_the_engine(
    make_settings: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(core_module, "COMPACT_ABOVE", 8)
    settings = make_settings()
    with engine_thread(settings, tmp_path) as core:
        async with front(settings, core) as client:
            for _ in range(40):  # each with the default 60 s deadline, answered at once
                assert (await client.post("/classify", json={"inputs": "x", "model": "bert-clf"})).status_code == 200
            assert len(core._deadlines) <= 2 * len(core._requests) + 8 + 1


async def test_a_client_that_leaves_while_its_model_loads_runs_nothing(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings()
    with engine_thread(settings, tmp_path) as core:
        registry = core.registry
        build = registry._build_on_one_thread
        gate = threading.Event()

        def held_build(*args: Any) -> Any:
            gate.wait(30)
            return build(*args)

        registry._build_on_one_thread = held_build  # type: ignore[method-assign]
        async with front(settings, core) as client:
            leaver = asyncio.create_task(client.post("/classify", json={"inputs": "x", "model": "distilbert-clf"}))
            await until(lambda: registry.slot("distilbert-clf").state == "loading", "the load began")
            leaver.cancel()
            await asyncio.sleep(0.3)  # the front's Cancel reaches the engine
            gate.set()
            await until(lambda: registry.slot("distilbert-clf").state == "loaded", "the load ended")
            await asyncio.sleep(0.2)
            batcher = registry.slot("distilbert-clf").batcher
            assert batcher is not None and batcher.items == 0 and batcher.queue_depth == 0
            assert registry.slot("distilbert-clf").in_flight == 0
