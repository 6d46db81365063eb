"""Model lifecycle: lazy single-flight loads, failures that answer 503 and recover, listing."""

from __future__ import annotations

import asyncio
import gc
import shutil
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml
from fastapi import FastAPI

import app.registry.registry as registry_module
import app.registry.sources as sources_module
import app.runners.traced as traced_module
from app.catalog import TextClassificationEntry, TranslationEntry
from app.config import Settings
from app.main import create_app
from tests.conftest import core_of, serve

pytestmark = pytest.mark.anyio


@pytest.fixture
def count_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every real model load (build_runner call) by entry name."""
    loads: list[str] = []
    real = registry_module.build_runner

    def counting(entry: Any, path: Path) -> Any:
        loads.append(entry.name)
        time.sleep(0.2)  # widen the window in which concurrent requests could start a second load
        return real(entry, path)

    monkeypatch.setattr(registry_module, "build_runner", counting)
    return loads


async def test_twenty_concurrent_first_requests_load_the_model_once(
    client: httpx.AsyncClient, count_loads: list[str]
) -> None:
    responses = await asyncio.gather(
        *(client.post("/classify", json={"inputs": f"text {i}", "model": "bert-clf"}) for i in range(20))
    )
    assert [r.status_code for r in responses] == [200] * 20
    assert count_loads == ["bert-clf"]
    models = {m["name"]: m for m in (await client.get("/models")).json()["models"]}
    assert models["bert-clf"]["state"] == "loaded"
    assert models["bert-clf"]["memory_bytes"] > 0


def test_models_loaded_on_several_threads_at_once_all_load_whole(tiny_models: dict[str, Path]) -> None:
    # transformers' loading patches process-wide state: unserialized, two loads at once failed
    # ("Cannot copy out of meta tensor") or left weights uninitialized, every time.
    marian = TranslationEntry.model_validate(
        {"name": "m", "task": "translation", "source_lang": "en", "target_lang": "de", "source": {"path": "."}}
    )
    bert = TextClassificationEntry.model_validate({"name": "b", "task": "text-classification", "source": {"path": "."}})
    loads = [(marian, tiny_models["marian"]), (bert, tiny_models["bert-clf"]), (marian, tiny_models["marian"])]
    alone = registry_module.build_runner(marian, tiny_models["marian"])
    with ThreadPoolExecutor(len(loads)) as pool:
        runners = list(pool.map(lambda load: registry_module.build_runner(*load), loads))
    for together in (runners[0], runners[2]):
        for name, weights in alone.model.state_dict().items():
            assert torch.equal(together.model.state_dict()[name], weights), name
    assert runners[1].model.config.model_type == "bert"


async def test_hub_model_offline_answers_503_with_how_to_fix_at_once(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[bool] = []
    real = sources_module.snapshot_download

    def spy(*args: Any, **kwargs: Any) -> Any:
        asked.append(kwargs["local_files_only"])
        return real(*args, **kwargs)

    monkeypatch.setattr(sources_module, "snapshot_download", spy)
    r = await client.post("/classify", json={"inputs": "x", "model": "hub-sst2"})
    assert r.status_code == 503
    message = r.json()["message"]
    assert "example-org/not-cached-anywhere" in message
    assert "mount a model directory" in message and "python -m app download hub-sst2" in message
    assert "Retry-After" in r.headers
    assert asked == [True]  # offline, the cache is all it looks at: nothing waits on a network


async def test_failed_load_is_503_with_reason_then_recovers_once_fixed(
    tmp_path: Path, tiny_models: dict[str, Path], count_loads: list[str]
) -> None:
    model_dir = tmp_path / "late-model"
    model_dir.mkdir()
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(
        yaml.safe_dump(
            {"models": [{"name": "late", "task": "text-classification", "source": {"path": str(model_dir)}}]}
        )
    )
    app = create_app(Settings(catalog=catalog, hub="offline", load_retry_after_s=0.5))
    async with serve(app) as client:
        storm = await asyncio.gather(*(client.post("/classify", json={"inputs": "x"}) for _ in range(20)))
        assert {r.status_code for r in storm} == {503}
        assert "has no config.json" in storm[0].json()["message"]
        listed = (await client.get("/models")).json()["models"][0]
        assert listed["state"] == "failed" and "config.json" in listed["error"]

        shutil.rmtree(model_dir)
        shutil.copytree(tiny_models["bert-clf"], model_dir)
        again = await client.post("/classify", json={"inputs": "x"})
        assert again.status_code == 503  # still inside the retry window: no new attempt
        await asyncio.sleep(0.6)
        recovered = await client.post("/classify", json={"inputs": "x"})
        assert recovered.status_code == 200, recovered.text
    assert count_loads == ["late"]  # the storm and the early retry never reached the loader


@pytest.mark.faults
async def test_a_truncated_weights_file_is_a_503_naming_it_then_recovers_once_replaced(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    model_dir = tmp_path / "clf"
    shutil.copytree(tiny_models["bert-clf"], model_dir)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a download cut short
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(
        yaml.safe_dump({"models": [{"name": "clf", "task": "text-classification", "source": {"path": str(model_dir)}}]})
    )
    async with serve(create_app(Settings(catalog=catalog, hub="offline", load_retry_after_s=0.5))) as client:
        r = await client.post("/classify", json={"inputs": "x"})
        assert r.status_code == 503
        assert "weights file model.safetensors" in r.json()["message"]
        assert "truncated or corrupt" in r.json()["message"]
        assert "Retry-After" in r.headers
        listed = (await client.get("/models/clf")).json()
        assert listed["state"] == "failed" and "model.safetensors" in listed["error"]

        shutil.copy(tiny_models["bert-clf"] / "model.safetensors", weights)  # the operator replaces it
        await asyncio.sleep(0.6)
        assert (await client.post("/classify", json={"inputs": "x"})).status_code == 200


async def test_models_lists_every_entry_with_state_and_defaults(client: httpx.AsyncClient) -> None:
    await client.post("/embed", json={"inputs": "x"})
    body = (await client.get("/models")).json()
    assert body["hub"] == "offline"
    assert body["defaults"] == {
        "classify": "minilm-sentiment",
        "zero-shot": "nli",
        "translate": "marian-en-de",
        "summarize": "bart-sum",
        "embed": "minilm",
        "fill-mask": "bert-fill",
        "rerank": "bert-rerank",
        "token-classification": "bert-ner",
    }
    models = {m["name"]: m for m in body["models"]}
    assert models["minilm"]["state"] == "loaded" and models["minilm"]["loaded_on"] == "cpu"
    assert models["minilm"]["default_for"] == ["embed"]
    assert models["bert-clf"]["state"] == "not_loaded"
    assert models["marian-en-de"]["languages"] == "en->de"
    assert models["hub-sst2"]["source"] == "hub:example-org/not-cached-anywhere"


async def test_load_and_unload_through_the_api(client: httpx.AsyncClient) -> None:
    loaded = await client.post("/models/bert-clf/load")
    assert loaded.json() == {"name": "bert-clf", "state": "loaded"}
    unloaded = await client.post("/models/bert-clf/unload")
    assert unloaded.json() == {"name": "bert-clf", "state": "not_loaded"}
    # The catalog entry stays (GET answers 200), so DELETE is not offered: 405 says what is.
    refused = await client.delete("/models/bert-clf")
    assert refused.status_code == 405
    assert refused.headers["allow"] == "GET, POST"
    assert "allowed: GET, POST" in refused.json()["message"]
    assert (await client.get("/models/bert-clf")).json()["memory_bytes"] == 0
    assert (await client.post("/models/nope/load")).status_code == 404
    # The next request loads it again.
    assert (await client.post("/classify", json={"inputs": "x", "model": "bert-clf"})).status_code == 200


def budget_for(models: dict[str, Path], count: float) -> dict[str, float]:
    """A CPU budget (GiB) that holds ``count`` tiny classifiers' weights."""
    size = (models["bert-clf"] / "model.safetensors").stat().st_size
    return {"cpu": count * size * 1.05 / 1024**3}


def state_of(body: dict[str, Any]) -> dict[str, str]:
    return {m["name"]: m["state"] for m in body["models"]}


async def test_memory_budget_evicts_the_least_recently_used_idle_model(
    app_factory: Callable[..., FastAPI], tiny_models: dict[str, Path]
) -> None:
    async with serve(app_factory(memory_budget_gib=budget_for(tiny_models, 2))) as client:
        for name in ("bert-clf", "distilbert-clf"):
            assert (await client.post(f"/models/{name}/load")).status_code == 200
        await client.post("/classify", json={"inputs": "x", "model": "bert-clf"})  # distilbert is now the LRU
        assert (await client.post("/models/nli/load")).status_code == 200
        states = state_of((await client.get("/models")).json())
        assert states["distilbert-clf"] == "not_loaded"
        assert states["bert-clf"] == states["nli"] == "loaded"


async def test_pinned_or_busy_models_are_never_evicted(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    catalog = tmp_path / "catalog.yaml"
    entries = [
        {
            "name": "pinned",
            "task": "text-classification",
            "pinned": True,
            "source": {"path": str(tiny_models["bert-clf"])},
        },
        {
            "name": "busy",
            "task": "text-classification",
            "source": {"path": str(tiny_models["distilbert-clf"])},
        },
        {"name": "third", "task": "text-classification", "source": {"path": str(tiny_models["nli"])}},
    ]
    catalog.write_text(yaml.safe_dump({"models": entries}))
    settings = Settings(catalog=catalog, hub="offline", memory_budget_gib=budget_for(tiny_models, 2))
    app = create_app(settings)
    async with serve(app) as client:
        await client.post("/models/pinned/load")
        await client.post("/models/busy/load")
        registry = core_of(app).registry
        async with registry.use("busy"):  # a request in flight on "busy"
            r = await client.post("/models/third/load")
        assert r.status_code == 503
        assert "busy or pinned" in r.json()["message"]
        assert state_of((await client.get("/models")).json()) == {
            "pinned": "loaded",
            "busy": "loaded",
            "third": "failed",
        }


def weights_of(app: FastAPI, name: str) -> list[weakref.ref[Any]]:
    """Weak references to a loaded model's module and every one of its weight tensors."""
    model = core_of(app).registry.slot(name).runner.model
    return [weakref.ref(model), *(weakref.ref(t) for t in (*model.parameters(), *model.buffers()))]


def kept_traces(app: FastAPI, name: str) -> list[Any]:
    forward = core_of(app).registry.slot(name).runner.encoder.forward
    return [t for t in (forward._traced, forward._packed) if isinstance(t, torch.jit.ScriptModule)]


async def test_unloading_drops_every_weight_of_the_model(app_factory: Callable[..., FastAPI]) -> None:
    app = app_factory()
    async with serve(app) as client:
        await client.post("/embed", json={"inputs": "touch every weight once"})
        weights = weights_of(app, "minilm")
        assert len(weights) > 50  # MiniLM's module, its ~100 parameters and its buffers
        await client.post("/models/minilm/unload")
        gc.collect()
        assert [w for w in weights if w() is not None] == []  # nothing holds a weight: its memory is free


async def test_a_reloaded_model_reuses_its_trace_and_unloading_still_frees_it(
    app_factory: Callable[..., FastAPI],
) -> None:
    app = app_factory()
    async with serve(app) as client:
        await _reload_cycles(app, client)


async def _reload_cycles(app: FastAPI, client: httpx.AsyncClient) -> None:
    body = {"inputs": "the same text every time", "model": "minilm"}
    first = (await client.post("/embed", json=body)).json()["embeddings"][0]
    traces = kept_traces(app, "minilm")
    assert traces  # CPU models run a trace
    for _ in range(3):
        weights = weights_of(app, "minilm")
        await client.post("/models/minilm/unload")
        gc.collect()
        # TorchScript never frees a trace's code, so each entry keeps its trace for the life of the
        # process; unloading must leave it holding none of the weights, and drop them all.
        assert all(t.numel() == 0 for trace in traces for t in (*trace.parameters(), *trace.buffers()))
        assert [w for w in weights if w() is not None] == []
        again = (await client.post("/embed", json=body)).json()["embeddings"][0]
        assert [a is b for a, b in zip(kept_traces(app, "minilm"), traces, strict=True)] == [True] * len(traces)
        assert again == pytest.approx(first, abs=1e-5)  # the kept trace runs the new weights


async def test_a_model_that_cannot_be_traced_runs_eager_with_the_same_results(
    app_factory: Callable[..., FastAPI], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = app_factory()
    async with serve(app) as client:
        await _trace_refused(app, client, monkeypatch)


async def _trace_refused(app: FastAPI, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    body = {"inputs": "I love this movie", "model": "distilbert-clf", "parameters": {"top_k": None}}
    traced = (await client.post("/classify", json=body)).json()
    assert core_of(app).registry.slot("distilbert-clf").runner.forward.traced
    await client.post("/models/distilbert-clf/unload")
    monkeypatch.setattr(traced_module, "_traces", {})  # as if never traced in this process

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no TorchScript here")

    monkeypatch.setattr("torch.jit.trace", refuse)
    eager = (await client.post("/classify", json=body)).json()
    assert not core_of(app).registry.slot("distilbert-clf").runner.forward.traced
    pairs = list(zip(eager["results"][0], traced["results"][0], strict=True))
    assert [x["label"] for x, _ in pairs] == [y["label"] for _, y in pairs]
    assert [x["score"] for x, _ in pairs] == pytest.approx([y["score"] for _, y in pairs], abs=1e-5)


async def test_concurrent_first_loads_stay_within_the_memory_budget(
    app_factory: Callable[..., FastAPI], tiny_models: dict[str, Path]
) -> None:
    budget = budget_for(tiny_models, 1.5)
    async with serve(app_factory(memory_budget_gib=budget)) as client:
        bodies = [("/classify", "bert-clf"), ("/classify", "distilbert-clf"), ("/embed", "bert-embed")]
        answers = await asyncio.gather(*(client.post(path, json={"inputs": "x", "model": m}) for path, m in bodies))
        for r in answers:
            assert r.status_code == 200 or (r.status_code == 503 and "busy or pinned" in r.json()["message"]), r.text
        listed = (await client.get("/models")).json()["models"]
        resident = sum(m["memory_bytes"] for m in listed if m["state"] == "loaded")
        assert 0 < resident <= budget["cpu"] * 1024**3
