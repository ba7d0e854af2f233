"""Operations: liveness, readiness (engine up and steering self-test passed) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

router = APIRouter()


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    reason: str | None = None
    adapters: int = 0


@router.get("/health", response_model=Health)
async def health() -> Health:
    """The process is alive (it may still be starting)."""
    return Health(status="ok")


@router.get("/ready", response_model=Readiness, responses={503: {"model": Readiness}})
async def ready(request: Request) -> JSONResponse:
    """The engine is up, passed the LoFiT steering self-test, and has not died."""
    state = request.app.state.lofit
    reason = state.not_ready_reason()
    body = Readiness(ready=reason is None, reason=reason, adapters=len(state.registry.records)
                     if state.registry else 0)
    return JSONResponse(body.model_dump(), status_code=200 if reason is None else 503)


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text format: per-adapter request counters and latency histograms, running/waiting gauges."""
    return Response(generate_latest(request.app.state.lofit.metrics.registry), media_type=CONTENT_TYPE_LATEST)
