"""The steering playground at ``/ui``: static files from ``server/ui/`` (no build step, nothing from a CDN).

The page itself is open, as ``/docs`` is: it holds no data. Everything it shows comes from ordinary API calls the
browser makes with the inference key the user types in (``/v1/completions``, ``/v1/chat/completions``,
``/tokenize``, ``GET /adapters`` and ``GET /adapters/{name}/files/...``), each shown on the page as a curl
command. ``lofit-serve --no-ui`` leaves it out.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

UI_DIR = Path(__file__).with_name("ui")
UI_PATH = "/ui"
# the page loads only its own files; the head map is shown from a blob: URL made from an authenticated fetch
POLICY = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
          "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


class PlaygroundFiles(StaticFiles):
    """Starlette's static files with a strict content security policy and no caching of stale versions."""

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers["content-security-policy"] = POLICY
        response.headers["x-content-type-options"] = "nosniff"
        response.headers["cache-control"] = "no-cache"
        return response


def mount(app: FastAPI) -> None:
    """Serve the playground at ``/ui/`` (``/ui`` redirects there)."""
    app.mount(UI_PATH, PlaygroundFiles(directory=UI_DIR, html=True), name="ui")
