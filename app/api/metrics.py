"""GET /metrics: every process's Prometheus metrics (app/metrics.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.api.errors import error_responses

router = APIRouter(tags=["operations"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "content": {
                "text/plain": {
                    "example": 'tessera_requests_total{route="/classify",model="minilm",status="200"} 42.0\n'
                }
            }
        },
        **error_responses(401),
    },
    summary="Prometheus metrics",
)
async def metrics(request: Request) -> Response:
    """Request, batch, queue and model metrics in the Prometheus text format. On a cluster
    (Ray Serve), every live replica's, each sample labelled with its `replica`; with front
    processes (TESSERA_WORKERS), every process's, each sample labelled with its `process`."""
    return Response(await request.app.state.exposition(), media_type=CONTENT_TYPE_LATEST)
