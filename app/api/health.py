"""Liveness and readiness, for load balancers and orchestrators."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from app.api.calls import registry_of
from app.registry.slots import Models, ModelState

router = APIRouter(tags=["health"])


class Health(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok", "waiting_for": [], "failed": []}]})
    status: str
    waiting_for: list[str] = Field(default_factory=list, description="Preload models not loaded yet.")
    failed: list[str] = Field(default_factory=list, description="Preload models whose load failed.")


def preload_status(registry: Models) -> tuple[list[str], list[str]]:
    """The preload models not loaded yet, and those of them whose load failed."""
    preload = [s for s in registry.slots() if s.entry.preload]
    waiting = [s.entry.name for s in preload if s.state is not ModelState.loaded]
    return waiting, [s.entry.name for s in preload if s.state is ModelState.failed]


@router.get("/health/live", response_model=Health, summary="Liveness")
async def live() -> Health:
    """200 while the process and its event loop answer; never waits on a model."""
    return Health(status="ok")


@router.get(
    "/health/ready",
    response_model=Health,
    responses={
        503: {
            "model": Health,
            "description": "Preload models still loading (or failed), the server draining, or (in a front "
            "process) the engine not answering.",
            "content": {
                "application/json": {"example": {"status": "loading", "waiting_for": ["distilbert-sst2"], "failed": []}}
            },
        }
    },
    summary="Readiness",
)
async def ready(request: Request) -> Health | JSONResponse:
    """200 once every catalog entry marked `preload` is loaded; 503 naming the missing ones,
    while the server drains before it stops (status `draining`), or while a front process
    hears nothing from the engine that holds the models (status `no_engine`)."""
    if request.app.state.drain.draining:
        return JSONResponse(Health(status="draining").model_dump(), status_code=503)
    registry = registry_of(request)
    if not registry.connected:  # a front process whose engine is gone or stuck
        return JSONResponse(Health(status="no_engine").model_dump(), status_code=503)
    waiting, failed = preload_status(registry)
    if waiting:
        body = Health(status="loading" if not failed else "failed", waiting_for=waiting, failed=failed)
        return JSONResponse(body.model_dump(), status_code=503)
    return Health(status="ok")
