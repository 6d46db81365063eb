"""The serve entry point (app/serving.py) turns the process's knobs, and only it: the garbage
collector (a frozen long-lived heap, young collections spaced out while serving) and the
tokenizers' thread pool. An app made by create_app alone, embedded in another process,
leaves them as they were. Its HTTP server sends each response in one write (app/http_protocol.py)."""

from __future__ import annotations

import asyncio
import gc
import os
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from app import serving
from app.config import Settings
from app.heap import YOUNG_THRESHOLD
from app.http_protocol import ON_DISCONNECT, GatheringTransport, HttpProtocol
from app.main import create_app
from tests.conftest import core_of, serve

pytestmark = pytest.mark.anyio


def test_young_collections_are_spaced_out_while_serving_only(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = gc.get_threshold()
    seen: list[tuple[int, ...]] = []
    monkeypatch.setattr(serving.DrainingServer, "run", lambda self, sockets=None: seen.append(gc.get_threshold()))
    settings = make_settings()
    serving.run(serving.build(settings), settings)
    assert seen == [(max(before[0], YOUNG_THRESHOLD), *before[1:])]
    assert gc.get_threshold() == before  # the process's own settings once the server stops


async def test_a_loaded_model_stays_out_of_garbage_collections_yet_unloading_frees_it(
    make_settings: Callable[..., Settings],
) -> None:
    app = serving.build(make_settings())
    try:
        async with serve(app) as client:
            await client.post("/classify", json={"inputs": "hello", "model": "bert-clf"})
            model = core_of(app).registry.slot("bert-clf").runner.model
            # Frozen (app/heap.py): no collection walks the model's objects while it serves.
            assert gc.get_freeze_count() > 0
            assert not any(obj is model for obj in gc.get_objects())
            # A reference cycle through the model must not keep it alive once unloaded.
            model.__dict__["_test_cycle"] = [model]
            gone = weakref.ref(model)
            del model
            await client.post("/models/bert-clf/unload")
            assert gone() is None
    finally:
        gc.unfreeze()


async def test_an_app_made_by_create_app_leaves_the_process_knobs_alone(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    gc.unfreeze()
    thresholds: Any = gc.get_threshold()
    async with serve(create_app(make_settings())) as client:
        assert (await client.post("/classify", json={"inputs": "hello", "model": "bert-clf"})).status_code == 200
        await client.post("/models/bert-clf/unload")
        assert gc.get_freeze_count() == 0 and gc.get_threshold() == thresholds
    assert "TOKENIZERS_PARALLELISM" not in os.environ


class RecordingTransport(asyncio.Transport):
    """A connection's server side that records what the server writes, one entry per write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


async def answer(request: dict[str, Any], receive: Any, send: Any) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"5")],
        }
    )
    await send({"type": "http.response.body", "body": b"hello"})


async def test_a_response_leaves_in_one_write_with_its_head_and_body() -> None:
    config = uvicorn.Config(answer, log_config=None, access_log=False, http=HttpProtocol)
    protocol = HttpProtocol(config, ServerState(), {}, asyncio.get_running_loop())
    transport = RecordingTransport()
    protocol.connection_made(transport)
    for _ in range(2):  # a second request on the kept-alive connection: one write again
        before = len(transport.writes)
        protocol.data_received(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
        for _ in range(5):
            await asyncio.sleep(0)
        [written] = transport.writes[before:]
        head, _, body = written.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and b"content-type: text/plain" in head
        assert body == b"hello"


async def test_a_client_leaving_mid_request_is_told_to_the_app_and_one_leaving_after_is_not() -> None:
    told: list[str] = []
    release = asyncio.Event()

    async def slow(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope["extensions"][ON_DISCONNECT].append(lambda: told.append(scope["path"]))
        await release.wait()
        await answer(scope, receive, send)

    config = uvicorn.Config(slow, log_config=None, access_log=False, http=HttpProtocol)
    for path, leaves_first in (("/left", True), ("/stayed", False)):
        protocol = HttpProtocol(config, ServerState(), {}, asyncio.get_running_loop())
        transport = RecordingTransport()
        protocol.connection_made(transport)
        protocol.data_received(f"GET {path} HTTP/1.1\r\nhost: test\r\n\r\n".encode())
        await asyncio.sleep(0)
        if not leaves_first:
            release.set()
            for _ in range(5):
                await asyncio.sleep(0)
            assert transport.writes  # answered in full
        protocol.connection_lost(None)
    release.set()
    assert told == ["/left"]


async def test_writes_gathered_go_out_in_order_before_close_and_none_after_it() -> None:
    transport = RecordingTransport()
    gathering = GatheringTransport(transport, asyncio.get_running_loop())
    gathering.write(b"a")
    gathering.writelines([b"b", bytearray(b"c")])
    assert transport.writes == []  # not before this turn of the loop ends
    gathering.close()
    assert transport.writes == [b"abc"] and transport.closed
    gathering.write(b"late")
    await asyncio.sleep(0)
    assert transport.writes == [b"abc"]  # a closed connection is written no more


def test_the_server_speaks_http_through_the_gathering_protocol(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Any] = []
    monkeypatch.setattr(serving.DrainingServer, "run", lambda self, sockets=None: seen.append(self.config.http))
    settings = make_settings()
    serving.run(serving.build(settings), settings)
    assert seen == [HttpProtocol]


def test_a_process_that_runs_models_trims_malloc_once_quiet() -> None:
    """glibc's free pages go back when the process goes quiet (app/heap.py): one thread per process."""
    import ctypes
    import threading

    from app import heap

    try:
        ctypes.CDLL("libc.so.6").malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    assert heap.trim_when_quiet() and heap.trim_when_quiet()
    assert [t.name for t in threading.enumerate()].count("malloc-trim") == 1
