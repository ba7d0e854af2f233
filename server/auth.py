"""API keys: one for inference routes, a separate one for adapter administration."""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request


def _presented(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.headers.get("x-api-key")


def _check(presented: str | None, expected: str) -> None:
    if presented is None:
        raise HTTPException(401, "missing API key (Authorization: Bearer <key>)",
                            headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(presented.encode(), expected.encode()):
        raise HTTPException(403, "wrong API key")


def require_inference_key(request: Request) -> None:
    """Inference routes: open when the server has no ``--api-key``; the admin key is accepted too."""
    settings = request.app.state.lofit.settings
    if settings.api_key is None:
        return
    presented = _presented(request)
    if presented is not None and settings.admin_key and hmac.compare_digest(presented.encode(),
                                                                            settings.admin_key.encode()):
        return
    _check(presented, settings.api_key)


def require_admin_key(request: Request) -> None:
    """Adapter load/unload: needs ``--admin-key``; the inference key never grants it."""
    settings = request.app.state.lofit.settings
    if settings.admin_key is None:
        raise HTTPException(403, "adapter administration is disabled: start the server with --admin-key")
    _check(_presented(request), settings.admin_key)
