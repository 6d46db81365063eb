"""How a serving process opens its engine (the one process, the engine process, a Ray
replica alike): the hub's reachability decided, the registry made with the process's
metrics fed by its batches and loads, and the core over it."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from app import heap
from app.catalog import Catalog
from app.config import Settings
from app.engine.core import EngineCore
from app.engine.rate import rate_limit_of
from app.metrics import Metrics
from app.registry.sources import hf_offline_flag, probe_hub

log = logging.getLogger(__name__)


def tune_process(settings: Settings) -> None:
    """The knobs of a process that runs models (see the module)."""
    import torch  # here, not above: a front process runs no model and imports no torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    heap.trim_when_quiet()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)


async def decide_hub_online(settings: Settings) -> bool:
    if settings.hub == "offline" or hf_offline_flag():
        return False
    if settings.hub == "online":
        return True
    return await asyncio.to_thread(probe_hub, settings.hub_probe_timeout_s)


async def open_engine(
    settings: Settings, catalog: Catalog, metrics: Metrics, on_models_changed: Callable[[], None] | None
) -> EngineCore:
    """The engine over ``catalog``, not yet started; ``on_models_changed`` is called (off the
    event loop) after each model load or unload (the serve entry point's garbage collector)."""
    from app.registry.registry import ModelRegistry  # here: a front process imports no torch

    online = await decide_hub_online(settings)
    hooks = metrics.hooks()
    hooks.on_change = on_models_changed
    registry = ModelRegistry(settings, catalog, hub_online=online, hooks=hooks)
    metrics.watch(registry)
    log.info("hub %s; %d catalog models", "online" if online else "offline", len(catalog.models))
    return EngineCore(registry, rate_limit_of(settings))
