"""Every route of the server's own ``/openapi.json`` — vLLM's and ours — against the keys (on the session's
``battery_server``).

``ROUTES`` classifies each route, gives a request for it and what that request gets once past the keys (200,
or the route's own answer where a 200 is impossible here). As ``server/auth.py`` documents: admin routes need
the admin key (no key: 401, the inference key or a wrong one: 403); inference routes need the inference key or
the admin key (no key: 401, a wrong one: 403); open routes need none. A route in the schema that the table
lacks fails the suite, so a new route (a vLLM upgrade adds some) cannot go unclassified.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from lofit.adapter import CONFIG_FILE, TENSORS_FILE
from lofit.default_model import default_model_dir
from tests.server.conftest import ADMIN_KEY, API_KEY, Server, upload_fields
from tests.server.corpus import adapter_files

OPEN, INFERENCE, ADMIN = "open", "inference", "admin"
BASE = default_model_dir().name
PROBE = "authprobe"  # the adapter the admin routes upload, load and unload


def _probe_upload() -> dict:
    files = adapter_files(PROBE)
    return {"files": upload_fields(files[CONFIG_FILE], files[TENSORS_FILE])}


CHAT = [{"role": "user", "content": "Hi"}]

# (method, path in the schema) -> (who may call it, keyword arguments of a request, path values, its status
# once past the keys)
ROUTES: dict[tuple[str, str], tuple[str, dict, dict, int]] = {
    ("GET", "/health"): (OPEN, {}, {}, 200),
    ("GET", "/ready"): (OPEN, {}, {}, 200),
    ("GET", "/metrics"): (OPEN, {}, {}, 200),
    ("GET", "/load"): (OPEN, {}, {}, 200),
    ("GET", "/version"): (OPEN, {}, {}, 200),
    ("GET", "/ping"): (OPEN, {}, {}, 200),
    ("POST", "/ping"): (OPEN, {}, {}, 200),
    ("POST", "/generate"): (INFERENCE, {"json": {"prompt": "Hi", "max_tokens": 1}}, {}, 200),
    ("POST", "/v1/completions"): (INFERENCE, {"json": {"model": BASE, "prompt": "Hi", "max_tokens": 1}}, {}, 200),
    ("POST", "/v1/chat/completions"): (INFERENCE, {"json": {"model": BASE, "max_tokens": 1, "messages": CHAT}}, {},
                                       200),
    ("POST", "/v1/chat/completions/batch"): (INFERENCE, {"json": {"model": BASE, "max_tokens": 1,
                                                                  "messages": [CHAT]}}, {}, 200),
    ("POST", "/v1/responses"): (INFERENCE, {"json": {"model": BASE, "input": "Hi", "max_output_tokens": 1}}, {},
                                200),
    ("GET", "/v1/responses/{response_id}"): (INFERENCE, {}, {"response_id": "resp_none"}, 404),
    ("POST", "/v1/responses/{response_id}/cancel"): (INFERENCE, {}, {"response_id": "resp_none"}, 404),
    ("POST", "/v1/messages"): (INFERENCE, {"json": {"model": BASE, "max_tokens": 1, "messages": CHAT}}, {}, 200),
    ("POST", "/v1/messages/count_tokens"): (INFERENCE, {"json": {"model": BASE, "messages": CHAT}}, {}, 200),
    ("POST", "/invocations"): (INFERENCE, {"json": {"model": BASE, "prompt": "Hi", "max_tokens": 1}}, {}, 200),
    ("POST", "/generative_scoring"): (INFERENCE, {"json": {"model": BASE, "query": "Is it?", "items": ["yes"],
                                                           "label_token_ids": [1, 2]}}, {}, 200),
    ("POST", "/tokenize"): (INFERENCE, {"json": {"model": BASE, "prompt": "Hi"}}, {}, 200),
    ("POST", "/detokenize"): (INFERENCE, {"json": {"model": BASE, "tokens": [1, 2]}}, {}, 200),
    ("GET", "/kv_event_sources"): (INFERENCE, {}, {}, 200),
    ("GET", "/v1/models"): (INFERENCE, {}, {}, 200),
    ("GET", "/v1/models/{model}"): (INFERENCE, {}, {"model": "good"}, 200),
    ("GET", "/adapters"): (INFERENCE, {}, {}, 200),
    ("GET", "/adapters/{name}"): (INFERENCE, {}, {"name": "good"}, 200),
    # "good" has weights only (no heads.png): past the keys, the answer is 404
    ("GET", "/adapters/{name}/files/{filename}"): (INFERENCE, {}, {"name": "good", "filename": "heads.png"}, 404),
    ("POST", "/adapters"): (ADMIN, {"json": {"name": "good"}}, {}, 200),
    ("PUT", "/adapters/{name}"): (ADMIN, {"lazy": _probe_upload}, {"name": PROBE}, 200),
    ("POST", "/adapters/{name}/reload"): (ADMIN, {}, {"name": "good"}, 200),
    ("DELETE", "/adapters/{name}"): (ADMIN, {}, {"name": PROBE}, 200),
    ("POST", "/v1/load_lora_adapter"): (ADMIN, {"json": {"lora_name": "good", "lora_path": "good"}}, {}, 200),
    ("POST", "/v1/unload_lora_adapter"): (ADMIN, {"json": {"lora_name": PROBE}}, {}, 200),
    ("POST", "/scale_elastic_ep"): (ADMIN, {"json": {}}, {}, 400),
    ("POST", "/is_scaling_elastic_ep"): (ADMIN, {}, {}, 200),
}
HIDDEN = [  # routes vLLM leaves out of the schema: classified all the same
    (INFERENCE, "/inference/v1/generate"), (INFERENCE, "/v1/completions/render"), (INFERENCE, "/v1/messages/render"),
    (INFERENCE, "/v1/chat/completions/derender"), (ADMIN, "/inference/v1/abort_requests")]
UNLISTED_OPEN = ["/openapi.json", "/docs", "/redoc", "/ui/"]  # FastAPI's own pages and the playground: no schema
IDS = [f"{method} {path}" for method, path in ROUTES]


@pytest.fixture(scope="module")
def server(battery_server: Server) -> Iterator[Server]:
    yield battery_server
    httpx.delete(f"{battery_server.url}/adapters/{PROBE}", headers={"Authorization": f"Bearer {ADMIN_KEY}"})


def call(server: Server, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
    _, kwargs, values, _ = ROUTES[(method, path)]
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
    expected = ROUTES[(method, path)][3] if ROUTES[(method, path)][0] == OPEN else 403
    assert response.status_code == expected, response.text
    if expected == 403 and ROUTES[(method, path)][0] != OPEN:
        assert response.json()["error"]["message"] == "wrong API key"


@pytest.mark.parametrize(("method", "path"), list(ROUTES), ids=IDS)
@pytest.mark.parametrize("header", ["Authorization", "X-API-Key"])
def test_inference_key(server: Server, method: str, path: str, header: str):
    value = f"bearer {API_KEY}" if header == "Authorization" else API_KEY
    response = call(server, method, path, {header: value})
    if ROUTES[(method, path)][0] == ADMIN:
        assert response.status_code == 403, response.text
        assert "needs the admin key" in response.json()["error"]["message"]
    else:
        assert response.status_code == ROUTES[(method, path)][3], response.text


@pytest.mark.parametrize(("method", "path"), list(ROUTES), ids=IDS)
def test_admin_key(server: Server, method: str, path: str):
    """The admin key grants everything: the admin routes, and the inference routes too (server/auth.py)."""
    response = call(server, method, path, {"Authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == ROUTES[(method, path)][3], response.text


@pytest.mark.parametrize("path", UNLISTED_OPEN)
def test_schema_and_docs_need_no_key(server: Server, path: str):
    assert httpx.get(server.url + path).status_code == 200


@pytest.mark.parametrize(("kind", "path"), HIDDEN, ids=[p for _, p in HIDDEN])
def test_routes_outside_the_schema_are_guarded_too(server: Server, kind: str, path: str):
    assert httpx.post(server.url + path, json={}).status_code == 401
    inference = httpx.post(server.url + path, json={}, headers={"Authorization": f"Bearer {API_KEY}"})
    refused = inference.status_code == 403 and "needs the admin key" in inference.json()["error"]["message"]
    assert refused == (kind == ADMIN), inference.text  # (vLLM refuses its scale-out routes itself: disabled)

