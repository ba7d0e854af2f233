"""The FastAPI application: engine lifecycle, adapters at start-up, error mapping, limits and request logs."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lofit.heads import identity_from_checkpoint
from lofit.vllm.engine import AdmissionError
from server import api_adapters, api_generate, api_openai, api_ops
from server.engine import HTTP_REQUEST_ID, PromptTooLong, start_engine
from server.metrics import Metrics
from server.registry import AdapterRegistry, InvalidAdapter, UnknownAdapter
from server.settings import Settings

log = logging.getLogger("lofit.server")


@dataclass
class ServerState:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    engine: Any = None
    registry: AdapterRegistry | None = None
    tokenizer: Any = None
    started: int = field(default_factory=lambda: int(time.time()))
    ready: bool = False
    dead: str | None = None
    skipped_adapters: dict[str, str] = field(default_factory=dict)
    stop_server: Callable[[], None] | None = None  # set by lofit-serve: ends uvicorn's loop, draining requests

    def not_ready_reason(self) -> str | None:
        if self.dead:
            return self.dead
        if self.engine is not None and self.engine.errored:
            return "the engine has stopped"
        return None if self.ready else "starting"


async def start(state: ServerState) -> None:
    """Start the engine (its core runs the steering self-test first), then load every adapter on disk."""
    settings = state.settings
    base = identity_from_checkpoint(settings.model, name=settings.model.name)
    state.engine = start_engine(settings)
    state.tokenizer = state.engine.get_tokenizer()
    state.registry = AdapterRegistry(settings.adapters_dir, base, state.engine, settings.max_adapters)
    status = await state.engine.collective_rpc("lofit_status")  # answered once the self-test has passed
    log.info("engine ready: %s", status)
    for name in state.registry.names_on_disk():
        try:
            await state.registry.load(name)
            log.info("adapter %s loaded", name)
        except InvalidAdapter as exc:
            state.skipped_adapters[name] = str(exc)
            log.error("adapter %s skipped: %s", name, exc)
    state.metrics.adapters_loaded.set(len(state.registry.records))
    state.ready = True


async def watch_engine(state: ServerState) -> None:
    """If the engine dies, report not ready and stop the server with a failure status (a supervisor restarts)."""
    while True:
        await asyncio.sleep(0.5)
        if state.engine is not None and state.engine.errored:
            state.dead = "the engine has stopped"
            log.error("the vLLM engine died; shutting down")
            os.environ["LOFIT_SERVER_FAILED"] = "1"
            if state.stop_server is not None:
                state.stop_server()  # lofit-serve then exits with status 1
            else:
                os.kill(os.getpid(), signal.SIGTERM)
            return


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = app.state.lofit
        await start(state)
        watcher = asyncio.create_task(watch_engine(state))
        try:
            yield
        finally:
            watcher.cancel()
            if state.engine is not None:
                state.engine.shutdown()

    app = FastAPI(title="LoFiT steering server", version=_version(), lifespan=lifespan,
                  description="Generate with per-request LoFiT adapters (head offsets) on vLLM.")
    app.state.lofit = ServerState(settings)
    for module in (api_generate, api_openai, api_adapters, api_ops):
        app.include_router(module.router)
    _install_errors(app)
    _install_middleware(app, settings)
    return app


def _version() -> str:
    from lofit import __version__

    return __version__


def _error(status: int, message: str, kind: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}, **extra}, status_code=status)


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(UnknownAdapter)
    async def unknown_adapter(_: Request, exc: UnknownAdapter) -> JSONResponse:
        return _error(404, exc.args[0], "not_found_error")

    @app.exception_handler(InvalidAdapter)
    async def invalid_adapter(_: Request, exc: InvalidAdapter) -> JSONResponse:
        return _error(400, str(exc), "invalid_adapter")

    @app.exception_handler(PromptTooLong)
    async def too_long(_: Request, exc: PromptTooLong) -> JSONResponse:
        return _error(400, str(exc), "invalid_request_error")

    @app.exception_handler(AdmissionError)
    async def refused(_: Request, exc: AdmissionError) -> JSONResponse:
        return _error(400, str(exc), "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        """FastAPI's HTTPException and Starlette's own (an unknown route, a wrong method, bad multipart data)."""
        response = _error(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500
                          else "server_error")
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
        summary = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors[:5])
        return _error(422, f"invalid request: {summary}", "invalid_request_error", detail=errors)

    @app.exception_handler(Exception)
    async def crashed(_: Request, exc: Exception) -> JSONResponse:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(exc, EngineDeadError):
            return _error(503, "the engine has stopped", "server_error")
        if isinstance(exc, VLLMClientError):  # vLLM refuses the request itself (e.g. a sampling parameter)
            return _error(400, str(exc), "invalid_request_error")
        log.exception("unhandled error")
        return _error(500, "internal error", "server_error")


def _body_limit(settings: Settings, method: str) -> int:
    """Bytes a request body may have: an upload (PUT) holds two files, anything else is a small JSON body."""
    return settings.max_upload_bytes * 2 + 65536 if method == "PUT" else settings.max_body_bytes


class BodyLimit:
    """Count a request body as it arrives and refuse it once past the limit. A chunked body has no
    Content-Length for the check in ``limits_and_logs``; without this it would be read (or, for an upload,
    spooled to disk) whole before any handler could refuse it."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, seen = _body_limit(self.settings, scope["method"]), 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # raised inside the route's body parsing: FastAPI passes HTTPException on
                    raise HTTPException(400, f"request body larger than {limit} bytes")
            return message

        await self.app(scope, limited, send)


def _install_middleware(app: FastAPI, settings: Settings) -> None:
    app.add_middleware(BodyLimit, settings=settings)

    @app.middleware("http")
    async def limits_and_logs(request: Request, call_next):
        request_id = request.headers.get("x-request-id", "")
        if not (0 < len(request_id) <= 64 and request_id.replace("-", "").replace("_", "").isalnum()):
            request_id = uuid.uuid4().hex
        HTTP_REQUEST_ID.set(request_id)
        started = time.perf_counter()
        limit = _body_limit(settings, request.method)
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            response = _error(400, f"request body larger than {limit} bytes", "invalid_request_error")
        else:
            response = await call_next(request)
        response.headers["x-request-id"] = request_id
        log.info(json.dumps({"request_id": request_id, "method": request.method, "path": request.url.path,
                             "status": response.status_code,
                             "ms": round((time.perf_counter() - started) * 1000, 1)}))
        return response
