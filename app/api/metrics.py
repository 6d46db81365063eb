"""GET /metrics: every process's Prometheus metrics (app/metrics.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_TYPE

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
    processes (TESSERA_WORKERS), every process's, each sample labelled with its `process`.
    A scraper that accepts `application/openmetrics-text` gets OpenMetrics, whose latency
    histograms carry exemplars naming a traced request's `trace_id` (not on a cluster)."""
    openmetrics = request.app.state.cluster is None and "application/openmetrics-text" in request.headers.get(
        "accept", ""
    )
    exposition = request.app.state.exposition  # a cluster's takes no argument: text only
    text = await (exposition(True) if openmetrics else exposition())
    return Response(text, media_type=OPENMETRICS_TYPE if openmetrics else CONTENT_TYPE_LATEST)
