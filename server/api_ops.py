"""Operations: liveness and readiness (engine up and steering self-test passed). ``/metrics`` is vLLM's route
over vLLM's Prometheus registry, which holds the ``lofit_*`` series too (:mod:`server.metrics`)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

router = APIRouter()


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    reason: str | None = None
    adapters: int = 0


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
async def health(request: Request) -> JSONResponse:
    """The process is alive: 200 ``{"status": "ok"}``; 503 ``{"status": "dead"}`` once the engine has died (as
    vLLM's ``/health``)."""
    state = request.app.state.lofit
    dead = state.dead is not None or (state.engine is not None and state.engine.errored)
    return JSONResponse({"status": "dead" if dead else "ok"}, status_code=503 if dead else 200)


@router.get("/ready", response_model=Readiness, responses={503: {"model": Readiness}})
async def ready(request: Request) -> JSONResponse:
    """The engine is up, passed the LoFiT steering self-test, and has not died."""
    state = request.app.state.lofit
    reason = state.not_ready_reason()
    body = Readiness(ready=reason is None, reason=reason, adapters=len(state.registry.records)
                     if state.registry else 0)
    return JSONResponse(body.model_dump(), status_code=200 if reason is None else 503)
