"""The FastAPI application: vLLM's own OpenAI server with the steering parts added.

:func:`create_app` builds vLLM's app as ``vllm serve`` does (``build_app``: every route, request model, error
body and middleware of vLLM's server) and adds what is ours: ``POST /generate``, the adapter routes (and vLLM's
``/v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` calls over them), ``GET /v1/models/{id}``, ``/health``
and ``/ready``, keys on every route (:mod:`server.auth`), request ids and JSON request logs, body limits, the
``lofit_*`` metrics, and an exit status of 1 when the engine dies. At start-up it runs the engine
(:class:`server.engine_client.SteeredAsyncLLM`, whose core runs the steering self-test), vLLM's
``init_app_state`` over it, then loads every adapter on disk.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import logging
import os
import signal
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.routing import Match

from lofit.heads import BaseModelIdentity
from lofit.vllm.architectures import cpu_engine_defaults, lofit_engine_args
from lofit.vllm.contract import RPC_STATUS
from server import api_adapters, api_generate, api_models, api_ops, api_ui
from server.adapter_misses import UNAVAILABLE, LoadOnMiss, StoreLoader
from server.adapter_store import AdapterStore, StoreUnavailable
from server.api_generate import PromptTooLong
from server.auth import KeyCheck, send_error
from server.engine_client import ROUTE, SteeredAsyncLLM
from server.metrics import LiveRequests, Metrics
from server.registry import AdapterCapacity, AdapterRegistry, InvalidAdapter, UnknownAdapter
from server.settings import Settings
from server.steering import SteeringResolver
from server.vllm_api import (
    RESOLVER_ATTR,
    build_app,
    create_error_response,
    get_prometheus_registry,
    init_app_state,
    install_plain_chat_content,
    install_render_guard,
    install_steering_hook,
    sanitize_message,
)
from server.vllm_flags import vllm_namespace

log = logging.getLogger("lofit.server")
SUPPORTED_TASKS = ("generate",)
OUR_ROUTES = ("/generate", "/adapters")  # request-validation errors here are 422 (their contract); vLLM's are 400


@dataclass
class ServerState:
    settings: Settings
    metrics_registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    metrics: Metrics | None = None
    engine: SteeredAsyncLLM | None = None
    registry: AdapterRegistry | None = None
    store_loader: StoreLoader | None = None  # load-on-miss (and pinned references) from --adapter-store
    resolver: SteeringResolver | None = None
    tokenizer: Any = None
    ready: bool = False
    dead: str | None = None
    skipped_adapters: dict[str, str] = field(default_factory=dict)
    collectors: list[Any] = field(default_factory=list)  # ours, in vLLM's Prometheus registry while serving
    stop_server: Callable[[], None] | None = None  # set by lofit-serve: ends uvicorn's loop, draining requests

    def not_ready_reason(self) -> str | None:
        if self.dead:
            return self.dead
        if self.engine is not None and self.engine.errored:
            return "the engine has stopped"
        return None if self.ready else "starting"


def vllm_args(settings: Settings) -> argparse.Namespace:
    """vLLM's ``vllm serve`` arguments for the settings: the user's vLLM flags, with the model, its LoFiT
    wrapper and admission check, and lofit-serve's own flags applied (keys stay with lofit-serve)."""
    if settings.vllm_args is None:
        settings.vllm_args = vllm_namespace(list(settings.vllm_flags))
    args = copy.copy(settings.vllm_args)
    given = {flag.split("=")[0].lstrip("-").replace("-", "_") for flag in settings.vllm_flags if flag.startswith("--")}
    engine = lofit_engine_args(settings.model, hf_overrides=args.hf_overrides or {},
                               logits_processors=args.logits_processors)
    args.model, args.model_tag = engine["model"], None
    args.hf_overrides, args.logits_processors = engine["hf_overrides"], engine["logits_processors"]
    args.served_model_name = [settings.base_name]
    args.dtype, args.max_model_len, args.max_num_seqs = settings.dtype, settings.max_model_len, settings.max_num_seqs
    args.host, args.port, args.api_key = settings.host, settings.port, None
    for name, value in cpu_engine_defaults(settings.kv_cache_gib).items():  # --kv-cache-gib wins over the env
        if name not in given:
            setattr(args, name, value)
    return args


def start_engine(args: argparse.Namespace) -> SteeredAsyncLLM:
    """Build the engine for ``args`` as ``vllm serve`` does (blocks until the engine core is up)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    engine_args = AsyncEngineArgs.from_cli_args(args)
    config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
    return SteeredAsyncLLM.from_vllm_config(config, usage_context=UsageContext.OPENAI_API_SERVER,
                                            enable_log_requests=engine_args.enable_log_requests,
                                            disable_log_stats=engine_args.disable_log_stats)


async def start(app: FastAPI, state: ServerState) -> None:
    """Start the engine (its core runs the steering self-test first), vLLM's serving objects over it, then load
    every adapter on disk."""
    settings, args = state.settings, app.state.args
    state.engine = start_engine(args)
    status = await unless_engine_dies(state.engine, state.engine.collective_rpc(RPC_STATUS))  # after the self-test
    log.info("engine ready: %s", {k: v for k, v in status[0].items() if k != "base"})
    base = BaseModelIdentity.from_dict(status[0]["base"])  # the workers' fingerprint of the served weights
    await init_app_state(state.engine, app.state, args, SUPPORTED_TASKS)
    install_render_guard(app.state.online_renderer)
    if getattr(app.state, "serving_structured_decisions", None) is None:  # vLLM answers 501 for such a model
        app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != "/v1/systemone"]
    models = app.state.openai_serving_models
    for path in models.base_model_paths:
        path.model_path = path.name  # GET /v1/models shows names, never server paths
    state.tokenizer = state.engine.get_tokenizer()
    if not settings.trust_chat_control_tokens:
        install_plain_chat_content(state.engine.renderer)
    state.metrics = Metrics(state.metrics_registry, settings.base_name)
    state.registry = AdapterRegistry(settings.adapters_dir, base, state.engine, settings.max_adapters,
                                     reserved=frozenset([settings.base_name]), served=models.lora_requests,
                                     on_unload=state.metrics.retire)
    store = AdapterStore(settings.adapter_store, settings.adapter_store_options) if settings.adapter_store else None
    state.store_loader = StoreLoader(state.registry, store, settings.adapter_cache_dir if store else None,
                                     settings.adapter_store_ttl, metrics=state.metrics)
    state.metrics.adapters_loaded.set_function(lambda: len(state.registry.records))  # loads on a miss included
    if store is not None:
        log.info("adapter store %s (cache %s, TTL %g s)", store.uri, settings.adapter_cache_dir,
                 settings.adapter_store_ttl)
    state.resolver = SteeringResolver([settings.base_name], lambda: state.registry.records.keys())
    setattr(models, RESOLVER_ATTR, state.resolver)
    state.engine.attach(state.resolver, state.metrics, settings.prompt_limit, count=state.registry.count)
    state.collectors = [state.metrics_registry,
                        LiveRequests(state.engine.live_requests, settings.max_adapters, settings.base_name)]
    for collector in state.collectors:
        get_prometheus_registry().register(collector)
    if not settings.adapters_dir.is_dir() and store is None:
        log.warning("adapters directory %s does not exist: serving no adapters until one is uploaded",
                    settings.adapters_dir)
    if store is not None:
        try:
            await asyncio.to_thread(store.prepare)
        except StoreUnavailable as exc:
            log.error("adapter store: %s (requests for adapters not loaded get 503 until it can be read)", exc)
    for name in state.registry.names_on_disk():
        try:
            await state.registry.load(name)
            log.info("adapter %s loaded", name)
        except InvalidAdapter as exc:
            state.skipped_adapters[name] = str(exc)
            log.error("adapter %s skipped: %s", name, exc)
    if store is not None:
        for record in state.registry.records.values():
            record.checked_at = float("-inf")  # the store's copy of a name wins: checked on first use
    await preload_from_store(state)
    state.metrics.adapters_loaded.set(len(state.registry.records))
    state.ready = True


async def preload_from_store(state: ServerState) -> None:
    """Load ``--adapter-store-preload`` (names, or every adapter of the store) through the same path as a miss;
    one that fails is reported under ``skipped``, as a broken folder is."""
    loader, names = state.store_loader, state.settings.adapter_store_preload
    if loader.store is None or not names:
        return
    if names == ["all"]:
        try:
            names = await asyncio.to_thread(loader.store.names)
        except StoreUnavailable as exc:
            state.skipped_adapters["all"] = f"the adapter store cannot be listed: {exc}"
            log.error("adapter store: preload skipped: %s", exc)
            return
    for name in names:
        try:
            await loader.ensure([name])
            if name not in state.registry.records:
                raise InvalidAdapter(f"adapter {name!r} is not in the adapter store")
            log.info("adapter %s loaded (%s)", name, state.registry.records[name].source)
        except (InvalidAdapter, StoreUnavailable) as exc:
            state.skipped_adapters[name] = str(exc)
            log.error("adapter %s skipped: %s", name, exc)


async def unless_engine_dies(engine: Any, call: Any) -> Any:
    """Await ``call``, an RPC to the engine; raise ``RuntimeError`` if the engine dies first (its core failed the
    steering self-test at start, say), rather than waiting for an answer that will never come."""
    task = asyncio.ensure_future(call)
    while not task.done():
        await asyncio.wait({task}, timeout=0.5)
        if not task.done() and engine.errored:
            task.cancel()
            raise RuntimeError("the vLLM engine stopped while starting (its log above says why, e.g. the LoFiT "
                               "self-test)")
    return task.result()


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
    """The server's app for ``settings`` (the engine starts in its lifespan)."""
    install_steering_hook()
    args = vllm_args(settings)
    app = build_app(args, SUPPORTED_TASKS)
    vllm_lifespan = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state: ServerState = app.state.lofit
        try:
            await start(app, state)
            watcher = asyncio.create_task(watch_engine(state))
            try:
                async with vllm_lifespan(app):
                    yield
            finally:
                watcher.cancel()
        finally:
            if state.engine is not None:
                state.engine.shutdown()
            for collector in state.collectors:
                get_prometheus_registry().unregister(collector)

    app.router.lifespan_context = lifespan
    app.title, app.version = "LoFiT steering server", _version()
    app.description = ("vLLM's OpenAI-compatible server with per-request LoFiT adapters (head offsets): `model` = "
                       "an adapter's name, or `adapter` / `adapter_scale` / `adapters` in the body.")
    app.state.lofit = ServerState(settings)
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != "/health"]  # ours below
    for route in app.router.routes:  # answers vLLM gives but does not always declare in its schema
        if isinstance(route, APIRoute):
            route.responses.setdefault(400, {"description": "invalid request (vLLM answers validation errors "
                                                            "with 400)"})
            if "{response_id}" in route.path:
                route.responses.setdefault(404, {"description": "no response with this id"})
    for module in (api_generate, api_models, api_adapters, api_ops):
        app.include_router(module.router)
    if settings.ui:
        api_ui.mount(app)
    _install_errors(app)
    # outermost first, around vLLM's own (whose SageMaker bootstrap has already built the stack: rebuild it)
    app.user_middleware[0:0] = [Middleware(cls, settings=settings)
                                for cls in (RequestLog, KeyCheck, BodyLimit, LoadOnMiss)]
    app.middleware_stack = None
    return app


def _version() -> str:
    from lofit import __version__

    return __version__


def error(status: int, message: str, kind: str, **extra: Any) -> JSONResponse:
    """vLLM's error body (``{"error": {"message", "type", "param", "code"}}``), paths removed from the message."""
    body = create_error_response(message, kind, HTTPStatus(status)).model_dump()
    return JSONResponse({**body, **extra}, status_code=status)


def _install_errors(app: FastAPI) -> None:
    """Our exceptions in vLLM's error format; vLLM's own handlers (installed by ``build_app``) do the rest."""
    vllm_validation = app.exception_handlers[RequestValidationError]
    vllm_http = app.exception_handlers[HTTPException]

    @app.exception_handler(StarletteHTTPException)
    async def routing(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's own errors (no such route, a wrong method, bad multipart data) in the same error body."""
        response = await vllm_http(request, exc)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(UnknownAdapter)
    async def unknown_adapter(_: Request, exc: UnknownAdapter) -> JSONResponse:
        return error(404, exc.args[0], "NotFoundError")

    @app.exception_handler(InvalidAdapter)
    async def invalid_adapter(_: Request, exc: InvalidAdapter) -> JSONResponse:
        return error(400, str(exc), "BadRequestError")

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(_: Request, exc: StoreUnavailable) -> JSONResponse:
        log.error("adapter store: %s", exc)
        return error(503, UNAVAILABLE, "ServiceUnavailableError")

    @app.exception_handler(AdapterCapacity)
    async def capacity(_: Request, exc: AdapterCapacity) -> JSONResponse:
        return error(503, str(exc), "ServiceUnavailableError")

    @app.exception_handler(PromptTooLong)
    async def too_long(_: Request, exc: PromptTooLong) -> JSONResponse:
        return error(400, str(exc), "BadRequestError")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        if not request.url.path.startswith(OUR_ROUTES):
            return await vllm_validation(request, exc)
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
        summary = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors[:5])
        return error(422, f"invalid request: {summary}", "UnprocessableEntityError", detail=errors)


def _body_limit(settings: Settings, method: str) -> int:
    """Bytes a request body may have: an upload (PUT) holds two files, anything else is a JSON body."""
    return settings.max_upload_bytes * 2 + 65536 if method == "PUT" else settings.max_body_bytes


class HttpMiddleware:
    """A pure ASGI middleware (no ``BaseHTTPMiddleware``: client disconnects must reach the routes) that handles
    HTTP requests in :meth:`http` and passes everything else on."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def http(self, scope: dict, receive: Any, send: Any) -> None:
        raise NotImplementedError


class BodyLimit(HttpMiddleware):
    """Count a request body as it arrives and refuse it once past the limit. A chunked body has no
    Content-Length for the check in :class:`RequestLog`; without this it would be read (or, for an upload,
    spooled to disk) whole before any handler could refuse it."""

    async def http(self, scope: dict, receive: Any, send: Any) -> None:
        limit, seen = _body_limit(self.settings, scope["method"]), 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # raised inside the route's body parsing: FastAPI answers it
                    from fastapi import HTTPException

                    raise HTTPException(400, f"request body larger than {limit} bytes")
            return message

        await self.app(scope, limited, send)


class RequestLog(HttpMiddleware):
    """The outermost layer: a request id (``X-Request-Id`` when valid, else a new one; vLLM names its engine
    request after it), the body's declared size, the route label of the ``lofit_*`` metrics, and one JSON log
    line per request."""

    async def http(self, scope: dict, receive: Any, send: Any) -> None:
        started = time.perf_counter()
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"x-request-id"]
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        valid = 0 < len(given) <= 64 and given.replace("-", "").replace("_", "").isalnum()
        request_id = given if valid else uuid.uuid4().hex
        scope = {**scope, "headers": [*headers, (b"x-request-id", request_id.encode())]}
        status = 500

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)

        token = ROUTE.set(_route_of(scope))
        try:
            limit = _body_limit(self.settings, scope["method"])
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > limit):
                await send_error(send_with_id, 400, f"request body larger than {limit} bytes", "BadRequestError")
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            ROUTE.reset(token)
            log.info(json.dumps({"request_id": request_id, "method": scope["method"], "path": scope["path"],
                                 "status": status, "ms": round((time.perf_counter() - started) * 1000, 1)}))


def _route_of(scope: dict) -> str:
    """The path template of the route that serves ``scope`` (a bounded metrics label), else ``other``."""
    for route in getattr(getattr(scope.get("app"), "router", None), "routes", ()):
        if route.matches(scope)[0] == Match.FULL and getattr(route, "path", None):
            return route.path
    return "other"


__all__ = ["ServerState", "create_app", "error", "sanitize_message", "start_engine", "vllm_args"]
