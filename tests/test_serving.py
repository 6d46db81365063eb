"""The serve entry point (app/serving.py) turns the process's knobs, and only it: the garbage
collector (a frozen long-lived heap, young collections spaced out while serving) and the
tokenizers' thread pool. An app made by create_app alone, embedded in another process,
leaves them as they were."""

from __future__ import annotations

import gc
import os
import weakref
from collections.abc import Callable
from typing import Any

import pytest

from app import serving
from app.config import Settings
from app.heap import YOUNG_THRESHOLD
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
