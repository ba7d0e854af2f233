"""The HTTP server as users meet it: a real ``lofit-serve`` process on 127.0.0.1 (the session's ``main_server``).

It serves SmolLM2-135M in float32 with an API key and an admin key, from an adapters folder holding the
shipped ``truthfulqa`` adapter, a second random adapter, a broken one and one named as the served model (both
must be skipped).
"""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lofit.adapter import load_adapter
from tests.server.conftest import ADMIN, API_KEY, AUTH, BASE, PROMPT, SHIPPED, random_adapter, upload_fields


@pytest.fixture(scope="module")
def server(main_server):
    return main_server


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as c:
        yield c


def generate(client, **body) -> dict:
    response = client.post("/generate", json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_start_up_loads_good_adapters_and_reports_the_broken_one(server, client):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    listed = client.get("/adapters").json()
    assert [a["name"] for a in listed["adapters"]] == ["random4", "truthfulqa"]
    assert "broken" in listed["skipped"] and "safetensors" in listed["skipped"]["broken"].lower()
    assert "served model's name" in listed["skipped"][BASE]
    info = client.get("/adapters/truthfulqa").json()
    assert info["content_sha256"] == load_adapter(SHIPPED).content_sha256 and info["num_heads"] == 8
    assert client.get("/adapters/broken").status_code == 404


def test_generate_steers_per_request(server, client):
    tagged = client.post("/generate", json={"prompt": PROMPT, "max_tokens": 2}, headers={"x-request-id": "trace-42"})
    assert tagged.headers["x-request-id"] == "trace-42"
    for _ in range(50):  # the line is written as the response ends: give the server a moment
        logged = [json.loads(line[line.index("{"):]) for line in server.log.read_text().splitlines()
                  if '"request_id": "trace-42"' in line]
        if logged:
            break
        time.sleep(0.1)
    assert logged and logged[-1]["path"] == "/generate" and logged[-1]["status"] == 200  # one JSON line per request
    plain, steered = generate(client), generate(client, adapter="truthfulqa")
    assert plain["adapter"] == {"name": None, "fingerprint": None}
    assert steered["adapter"]["name"] == "truthfulqa" and len(steered["adapter"]["fingerprint"]) == 32
    assert plain["text"] != steered["text"]
    assert steered["usage"]["completion_tokens"] == len(steered["token_ids"]) == 12
    assert generate(client, model="truthfulqa")["text"] == steered["text"]  # model names an adapter, as on /v1
    assert generate(client, model=BASE)["text"] == plain["text"]
    strong = generate(client, adapter="truthfulqa", adapter_scale=4.0)
    mixed = generate(client, adapters={"truthfulqa": 4.0})
    assert strong["text"] == mixed["text"] != steered["text"]
    assert strong["adapter"]["fingerprint"] == mixed["adapter"]["fingerprint"]
    batch = client.post("/generate", json={"prompt": [PROMPT, PROMPT], "adapter": "truthfulqa", "max_tokens": 12,
                                           "temperature": 0}).json()
    assert [r["text"] for r in batch] == [steered["text"]] * 2


def test_generate_streams_server_sent_events(client):
    expected = generate(client, adapter="random4")
    deltas, result = [], None
    with client.stream("POST", "/generate", json={"prompt": PROMPT, "adapter": "random4", "max_tokens": 12,
                                                  "temperature": 0, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "result" in event:
                result = event["result"]
            else:
                deltas.append(event["text"])
    assert "".join(deltas) == expected["text"] == result["text"]
    assert result["token_ids"] == expected["token_ids"]


def test_openai_sdk_with_the_adapter_as_model(server, client):
    from openai import OpenAI

    sdk = OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    names = {m.id: m.parent for m in sdk.models.list().data}
    assert names == {BASE: None, "truthfulqa": BASE, "random4": BASE}
    assert sdk.models.retrieve("truthfulqa").parent == BASE and sdk.models.retrieve(BASE).parent is None
    steered = sdk.completions.create(model="truthfulqa", prompt=PROMPT, max_tokens=12, temperature=0)
    plain = sdk.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=12, temperature=0)
    assert steered.choices[0].text == generate(client, adapter="truthfulqa")["text"]
    assert plain.choices[0].text == generate(client)["text"]
    chunks = sdk.completions.create(model="truthfulqa", prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == steered.choices[0].text
    messages = [{"role": "user", "content": "Can pigs fly?"}]
    chat = sdk.chat.completions.create(model="truthfulqa", messages=messages, max_tokens=16, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    stream = sdk.chat.completions.create(model="truthfulqa", messages=messages, max_tokens=16, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content
    base_chat = sdk.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=16,
                                            temperature=0)
    assert base_chat.choices[0].message.content != chat.choices[0].message.content


def test_concurrent_mixed_adapters_each_equal_their_solo_output(client):
    choices = [{}, {"adapter": "truthfulqa"}, {"adapter": "random4"}, {"adapter": "truthfulqa", "adapter_scale": 0.5},
               {"adapters": {"truthfulqa": 1.0, "random4": 1.0}}, {"adapter": "random4", "adapter_scale": -1.0}]
    prompts = [PROMPT, "Q: Is the Earth flat? A:", "Q: What is the capital of France? A:"]
    cases = [(prompts[i % 3], choices[i % len(choices)]) for i in range(18)]
    solo = [generate(client, prompt=p, **c)["text"] for p, c in cases]
    with concurrent.futures.ThreadPoolExecutor(18) as pool:
        together = list(pool.map(lambda case: generate(client, prompt=case[0], **case[1])["text"], cases))
    assert together == solo
    assert len(set(solo[:6])) >= 5


def test_hot_load_use_reload_and_unload(server, client):
    admin = httpx.Client(base_url=server.url, headers=ADMIN, timeout=60)
    hot = random_adapter("hot", seed=7)
    hot.save(server.adapters / "hot")
    assert client.post("/generate", json={"prompt": PROMPT, "adapter": "hot"}).status_code == 404
    loaded = admin.post("/adapters", json={"name": "hot"})
    assert loaded.status_code == 200 and loaded.json()["changed"] is True
    assert admin.post("/adapters", json={"name": "hot"}).json()["changed"] is False, "loading is idempotent"
    first = generate(client, adapter="hot")
    # upload new content under the same name: new fingerprint, new output
    other = random_adapter("hot", seed=8)
    staged = other.save(server.adapters.parent / "staging-hot")
    files = upload_fields((staged / "adapter_config.json").read_bytes(), (staged / "adapter.safetensors").read_bytes())
    uploaded = admin.put("/adapters/hot", files=files)
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json()["adapter"]["content_sha256"] == other.content_sha256
    second = generate(client, adapter="hot")
    assert second["adapter"]["fingerprint"] != first["adapter"]["fingerprint"] and second["text"] != first["text"]
    assert admin.delete("/adapters/hot").json() == {"name": "hot", "unloaded": True}
    assert admin.delete("/adapters/hot").json() == {"name": "hot", "unloaded": False}
    assert client.post("/generate", json={"prompt": PROMPT, "adapter": "hot"}).status_code == 404


@pytest.mark.parametrize(("method", "path", "body", "status", "message"), [
    ("post", "/generate", {"prompt": PROMPT, "adapter": "nope"}, 404, "not loaded: nope"),
    ("post", "/v1/completions", {"model": "nope", "prompt": PROMPT}, 404, "does not exist"),
    ("post", "/generate", {"prompt": PROMPT, "temperature": -1}, 422, "temperature"),
    ("post", "/generate", {"prompt": PROMPT, "adapter": "../etc"}, 422, "adapter"),
    ("post", "/generate", {"prompt": PROMPT, "surprise": 1}, 422, "surprise"),
    ("post", "/generate", {"prompt": "word " * 400}, 400, "at most 256"),
    ("post", "/generate", {"prompt": PROMPT, "adapter": "truthfulqa", "adapters": {"random4": 1}}, 422, "either"),
    # the rules of every route (found by the newcomer review: /generate ignored a lone or a mixed adapter_scale)
    ("post", "/generate", {"prompt": PROMPT, "adapter_scale": 5}, 422, "needs an adapter"),
    ("post", "/generate", {"prompt": PROMPT, "adapters": {"truthfulqa": 1}, "adapter_scale": 5}, 422,
     "goes with 'adapter'"),
    ("post", "/generate", {"prompt": PROMPT, "model": "truthfulqa", "adapter": "random4"}, 422,
     "does not include it"),
    ("post", "/generate", {"prompt": PROMPT, "model": "nope"}, 404, "does not exist"),
    ("post", "/generate", {"prompt": PROMPT, "adapter": "truthfulqa", "lofit_adapter": "truthfulqa"}, 422,
     "lofit_adapter: Extra inputs are not permitted"),
    # JSON booleans are not strengths (vLLM's routes refuse them too; pydantic would read true as 1.0)
    ("post", "/generate", {"prompt": PROMPT, "adapter": "truthfulqa", "adapter_scale": True}, 422, "not true/false"),
    ("post", "/generate", {"prompt": PROMPT, "adapters": {"truthfulqa": False}}, 422, "not true/false"),
    ("post", "/v1/completions", {"model": BASE, "prompt": PROMPT,
                                 "vllm_xargs": {"adapters": ["truthfulqa:1", "truthfulqa:40"]}}, 400, "more than once"),
])
def test_bad_requests_get_clear_errors(client, method, path, body, status, message):
    response = getattr(client, method)(path, json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]
    if status == 422:  # one error body for the route's schema and for its steering rules
        assert response.json()["error"]["type"] == "UnprocessableEntityError", response.text


def test_keys_guard_inference_and_admin(server):
    url = server.url
    body = {"prompt": PROMPT, "max_tokens": 2}
    assert httpx.post(f"{url}/generate", json=body).status_code == 401
    assert httpx.post(f"{url}/generate", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert httpx.post(f"{url}/adapters", json={"name": "truthfulqa"}).status_code == 401
    assert httpx.post(f"{url}/adapters", json={"name": "truthfulqa"}, headers=AUTH).status_code == 403
    assert httpx.delete(f"{url}/adapters/truthfulqa", headers=AUTH).status_code == 403
    assert httpx.get(f"{url}/health").status_code == 200


def test_broken_adapter_upload_is_rejected_with_its_reason(server, client):
    admin = httpx.Client(base_url=server.url, headers=ADMIN, timeout=60)
    files = upload_fields((SHIPPED / "adapter_config.json").read_bytes(), b"\x00" * 64)
    response = admin.put("/adapters/truthfulqa", files=files)
    assert response.status_code == 400 and "safetensors" in response.json()["error"]["message"].lower()
    assert admin.post("/adapters", json={"name": "../../etc"}).status_code == 422
    assert client.get("/adapters/truthfulqa").json()["content_sha256"] == load_adapter(SHIPPED).content_sha256
    assert generate(client, adapter="truthfulqa")["text"], "the server keeps serving"


def in_engine(client) -> float:
    """Requests running or waiting in the engine, by vLLM's own gauges."""
    return metric(client, "vllm:num_requests_running") + metric(client, "vllm:num_requests_waiting")


def metric(client, name: str, **labels) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels`` (parsed as Prometheus does)."""
    return sum(sample.value for family in text_string_to_metric_families(client.get("/metrics").text)
               for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def test_metrics_count_requests_per_adapter(client):
    before = metric(client, "lofit_requests_total", adapter="random4", route="/generate", outcome="finished")
    for _ in range(3):
        generate(client, adapter="random4")
    after = metric(client, "lofit_requests_total", adapter="random4", route="/generate", outcome="finished")
    assert after - before == 3
    assert client.get("/adapters/random4").json()["requests_served"] >= 3


def test_a_disconnected_stream_frees_its_request(client):
    with client.stream("POST", "/generate", json={"prompt": PROMPT, "max_tokens": 400, "stream": True,
                                                  "ignore_eos": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # leave after the first event
    deadline = time.time() + 30
    while time.time() < deadline:
        if in_engine(client) == 0:
            break
        time.sleep(0.5)
    assert in_engine(client) == 0
    assert metric(client, "lofit_requests_total", adapter=BASE, route="/generate", outcome="aborted") >= 1


def test_an_oversized_body_is_refused(client):
    response = client.post("/generate", content=b'{"prompt": "' + b"a" * (2 << 20) + b'"}',
                           headers={"content-type": "application/json"})
    assert response.status_code == 400 and "larger than" in response.json()["error"]["message"]
    assert client.get("/openapi.json").json()["paths"]["/generate"]["post"]["responses"]["200"]
