"""The answers match the server's own OpenAPI schema, in vLLM's error format: one test for each mismatch that
fuzzing found (``scripts/reliability/fuzz_api.py``), on the session's ``battery_server``."""

from __future__ import annotations

from collections.abc import Iterator
from http import HTTPStatus

import httpx
import pytest

from lofit.default_model import default_model_dir
from tests.server.conftest import ADMIN, PROMPT, Server

STREAMING_ROUTES = {
    "/generate": {"prompt": PROMPT, "max_tokens": 2},
    "/v1/completions": {"model": default_model_dir().name, "prompt": PROMPT, "max_tokens": 2},
    "/v1/chat/completions": {"model": default_model_dir().name, "max_tokens": 2,
                             "messages": [{"role": "user", "content": "Hi"}]},
}


@pytest.fixture(scope="module")
def client(battery_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=battery_server.url, headers=ADMIN, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def schema(client: httpx.Client) -> dict:
    return client.get("/openapi.json").json()


@pytest.mark.parametrize("route", list(STREAMING_ROUTES))
def test_a_stream_is_a_documented_content_type(client: httpx.Client, schema: dict, route: str):
    response = client.post(route, json={**STREAMING_ROUTES[route], "stream": True})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].split(";")[0] == "text/event-stream"
    assert response.text.rstrip().endswith("data: [DONE]")
    assert "text/event-stream" in schema["paths"][route]["post"]["responses"]["200"]["content"]


@pytest.mark.parametrize("route", list(STREAMING_ROUTES))
def test_a_temperature_vllm_refuses_is_a_4xx_not_a_500(client: httpx.Client, schema: dict, route: str):
    """``/generate`` answers its own schema's 422; vLLM's routes answer vLLM's 400."""
    response = client.post(route, json={**STREAMING_ROUTES[route], "temperature": 2.5 if route == "/generate"
                                        else -1})
    assert response.status_code == (422 if route == "/generate" else 400), response.text
    assert "temperature" in response.json()["error"]["message"]
    sampling = schema["components"]["schemas"]["GenerateRequest"]["properties"]["temperature"]
    assert sampling["maximum"] == 2.0


def test_unloading_a_bad_name_is_a_documented_400(client: httpx.Client, schema: dict):
    response = client.delete("/adapters/%2E%2E")
    assert response.status_code == 400 and "invalid adapter name" in response.json()["error"]["message"]
    assert "400" in schema["paths"]["/adapters/{name}"]["delete"]["responses"]


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "message"), [
    ("GET", "/no-such-route", {}, 404, "Not Found"),
    ("DELETE", "/generate", {}, 405, "Method Not Allowed"),
    ("PUT", "/adapters/x", {"content": b'{"not": "multipart"}', "headers": {
        "content-type": "multipart/form-data; boundary=zz", **ADMIN}}, 400, "Invalid multipart data"),
])
def test_routing_and_parsing_errors_use_the_error_format(client: httpx.Client, method: str, path: str,
                                                         kwargs: dict, status: int, message: str):
    response = client.request(method, path, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["type"] == HTTPStatus(status).phrase and message in error["message"]
