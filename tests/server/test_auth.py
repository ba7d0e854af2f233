"""Every route of the server's own ``/openapi.json`` against the keys (on the session's ``battery_server``).

``ROUTES`` classifies each route and gives a request it accepts. As ``server/auth.py`` documents: admin
routes need the admin key (no key: 401, the inference key or a wrong one: 403); inference routes need the
inference key or the admin key (no key: 401, a wrong one: 403); open routes need none. A route in the schema
that the table lacks fails the suite, so a new route cannot go untested.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from lofit.adapter import CONFIG_FILE, TENSORS_FILE
from lofit.models import default_model_dir
from tests.server.conftest import ADMIN_KEY, API_KEY, Server, upload_fields
from tests.server.corpus import adapter_files

OPEN, INFERENCE, ADMIN = "open", "inference", "admin"
BASE = default_model_dir().name
PROBE = "authprobe"  # the adapter the admin routes upload, load and unload


def _probe_upload() -> dict:
    files = adapter_files(PROBE)
    return {"files": upload_fields(files[CONFIG_FILE], files[TENSORS_FILE])}


# (method, path in the schema) -> (who may call it, keyword arguments of an accepted request, path values)
ROUTES: dict[tuple[str, str], tuple[str, dict, dict]] = {
    ("GET", "/health"): (OPEN, {}, {}),
    ("GET", "/ready"): (OPEN, {}, {}),
    ("GET", "/metrics"): (OPEN, {}, {}),
    ("POST", "/generate"): (INFERENCE, {"json": {"prompt": "Hi", "max_tokens": 1}}, {}),
    ("POST", "/v1/completions"): (INFERENCE, {"json": {"model": BASE, "prompt": "Hi", "max_tokens": 1}}, {}),
    ("POST", "/v1/chat/completions"): (INFERENCE, {"json": {"model": BASE, "max_tokens": 1, "messages": [
        {"role": "user", "content": "Hi"}]}}, {}),
    ("GET", "/v1/models"): (INFERENCE, {}, {}),
    ("GET", "/adapters"): (INFERENCE, {}, {}),
    ("GET", "/adapters/{name}"): (INFERENCE, {}, {"name": "good"}),
    ("POST", "/adapters"): (ADMIN, {"json": {"name": "good"}}, {}),
    ("PUT", "/adapters/{name}"): (ADMIN, {"lazy": _probe_upload}, {"name": PROBE}),
    ("DELETE", "/adapters/{name}"): (ADMIN, {}, {"name": PROBE}),
}
UNLISTED_OPEN = ["/openapi.json", "/docs", "/redoc"]  # FastAPI's own pages, not in the schema
IDS = [f"{method} {path}" for method, path in ROUTES]


@pytest.fixture(scope="module")
def server(battery_server: Server) -> Iterator[Server]:
    yield battery_server
    httpx.delete(f"{battery_server.url}/adapters/{PROBE}", headers={"Authorization": f"Bearer {ADMIN_KEY}"})


def call(server: Server, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
    _, kwargs, values = ROUTES[(method, path)]
    kwargs = dict(kwargs)
    lazy = kwargs.pop("lazy", None)
    if lazy is not None:
        kwargs.update(lazy())
    return httpx.request(method, server.url + path.format(**values), headers=headers, timeout=120, **kwargs)


def test_every_openapi_route_is_classified(server: Server):
    schema = httpx.get(f"{server.url}/openapi.json").json()
    routes = {(method.upper(), path) for path, ops in schema["paths"].items() for method in ops}
    assert not routes - set(ROUTES), f"routes missing from ROUTES (classify them): {sorted(routes - set(ROUTES))}"
    assert not set(ROUTES) - routes, f"ROUTES lists routes the server does not have: {sorted(set(ROUTES) - routes)}"


@pytest.mark.parametrize(("method", "path"), list(ROUTES), ids=IDS)
def test_no_key(server: Server, method: str, path: str):
    response = call(server, method, path, {})
    if ROUTES[(method, path)][0] == OPEN:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"] == "Bearer"
        assert "missing API key" in response.json()["error"]["message"]


@pytest.mark.parametrize(("method", "path"), list(ROUTES), ids=IDS)
@pytest.mark.parametrize("header", ["Authorization", "X-API-Key"])
def test_wrong_key(server: Server, method: str, path: str, header: str):
    value = "Bearer not-a-key" if header == "Authorization" else "not-a-key"
    response = call(server, method, path, {header: value})
    expected = 200 if ROUTES[(method, path)][0] == OPEN else 403
    assert response.status_code == expected, response.text


@pytest.mark.parametrize(("method", "path"), list(ROUTES), ids=IDS)
@pytest.mark.parametrize("header", ["Authorization", "X-API-Key"])
def test_inference_key(server: Server, method: str, path: str, header: str):
    value = f"bearer {API_KEY}" if header == "Authorization" else API_KEY
    response = call(server, method, path, {header: value})
    if ROUTES[(method, path)][0] == ADMIN:
        assert response.status_code == 403, response.text
        assert response.json()["error"]["message"] == "wrong API key"
    else:
        assert response.status_code == 200, response.text


@pytest.mark.parametrize(("method", "path"), list(ROUTES), ids=IDS)
def test_admin_key(server: Server, method: str, path: str):
    """The admin key grants everything: the admin routes, and the inference routes too (server/auth.py)."""
    response = call(server, method, path, {"Authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("path", UNLISTED_OPEN)
def test_schema_and_docs_need_no_key(server: Server, path: str):
    assert httpx.get(server.url + path).status_code == 200
