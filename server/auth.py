"""API keys on every route, checked from the headers before any body is read.

Each route is one of three kinds (:func:`access`):

* **open** — liveness, readiness, metrics and the API description: ``/health``, ``/ready``, ``/metrics``,
  ``/load``, ``/ping``, ``/version``, ``/openapi.json``, ``/docs``, ``/redoc``, and the playground's static files
  under ``/ui`` (the page asks for the key and sends it with each API call it makes);
* **inference** — generation and reading: ``POST /generate``, ``GET /adapters[/{name}]``, everything under
  ``/v1/`` (vLLM's OpenAI layer) but the adapter calls, ``/tokenize``, ``/detokenize``, ``/invocations``,
  ``/inference/v1/generate``, ...; needs ``--api-key`` (when the server has one) or the admin key;
* **admin** — everything else that exists: adapter load, upload and unload (``/adapters``,
  ``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``), and vLLM's operational routes (request aborts,
  elastic scaling, its development routes when enabled); needs ``--admin-key``, which the inference key never
  is; without ``--admin-key`` they are refused.

A key is presented as ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``. No key: 401 (with
``WWW-Authenticate: Bearer``); a wrong key: 403. A path no route serves passes through to its 404.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.routing import Match

OPEN, INFERENCE, ADMIN = "open", "inference", "admin"
OPEN_PATHS = {"/health", "/ready", "/metrics", "/load", "/ping", "/version", "/openapi.json", "/docs",
              "/docs/oauth2-redirect", "/redoc"}
ADMIN_PATHS = {"/v1/load_lora_adapter", "/v1/unload_lora_adapter"}
INFERENCE_PREFIXES = ("/v1/", "/v2/", "/cohere/")
INFERENCE_PATHS = {"/generate", "/tokenize", "/detokenize", "/tokenizer_info", "/invocations", "/generative_scoring",
                   "/inference/v1/generate", "/kv_event_sources", "/pooling", "/classify", "/score", "/rerank"}


def access(method: str, path: str) -> str:
    """``open``, ``inference`` or ``admin`` for a request to an existing route."""
    if path in OPEN_PATHS or path.startswith(("/metrics/", "/ui/")) or path == "/ui":
        return OPEN
    if path in ADMIN_PATHS:
        return ADMIN
    if path == "/adapters" or path.startswith("/adapters/"):
        return INFERENCE if method in ("GET", "HEAD") else ADMIN
    if path in INFERENCE_PATHS or path.startswith(INFERENCE_PREFIXES):
        return INFERENCE
    return ADMIN


def presented_key(headers: dict[str, str]) -> str | None:
    header = headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return headers.get("x-api-key")


def _matches(key: str | None, expected: str | None) -> bool:
    return key is not None and expected is not None and hmac.compare_digest(key.encode(), expected.encode())


def check(kind: str, key: str | None, api_key: str | None, admin_key: str | None) -> tuple[int, str] | None:
    """``None`` when the request may go on, else ``(status, message)``."""
    if kind == OPEN or (kind == INFERENCE and api_key is None):
        return None
    if kind == ADMIN and admin_key is None:
        return 403, "administration is disabled: start the server with --admin-key"
    if key is None:
        return 401, "missing API key (Authorization: Bearer <key>)"
    if _matches(key, admin_key) or (kind == INFERENCE and _matches(key, api_key)):
        return None
    if kind == ADMIN and _matches(key, api_key):
        return 403, "this route needs the admin key (--admin-key); the inference key is not enough"
    return 403, "wrong API key"


class KeyCheck:
    """Pure ASGI middleware applying :func:`check` to every HTTP request (``OPTIONS`` pass, for CORS)."""

    def __init__(self, app: Any, settings: Any) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or not _route_exists(scope):
            await self.app(scope, receive, send)
            return
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refused = check(access(scope["method"], path), presented_key(headers), self.settings.api_key,
                        self.settings.admin_key)
        if refused is None:
            await self.app(scope, receive, send)
            return
        status, message = refused
        extra = [(b"www-authenticate", b"Bearer")] if status == 401 else []
        await send_error(send, status, message, "Unauthorized" if status == 401 else "Forbidden", extra)


def _route_exists(scope: dict) -> bool:
    app = scope.get("app")
    routes = getattr(getattr(app, "router", None), "routes", None)
    if routes is None:
        return True
    return any(route.matches(scope)[0] != Match.NONE for route in routes)


async def send_error(send: Any, status: int, message: str, kind: str,
                     headers: list[tuple[bytes, bytes]] = ()) -> None:
    """Answer with vLLM's error body ``{"error": {"message", "type", "param", "code"}}``."""
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})
