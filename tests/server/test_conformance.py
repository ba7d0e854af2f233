"""``lofit-serve`` speaks vLLM's protocol: one table of requests sent to it and to vLLM's own OpenAI server (stock
vLLM, no plugin) on the same float32 checkpoint (the session's ``peers``).

For the base model the two must agree on everything but the request's id, its creation time and the config
fingerprint: the status code, the response's field set, the tokens, the log-probs (within 1e-3) and the error
bodies — streamed (event by event) and not. With an adapter, the tokens and the echoed prompt log-probs must equal
the transformers reference path (:mod:`lofit.intervene`), and every response names the adapter as ``model``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import torch

from lofit.adapter import load_adapter
from lofit.default_model import default_model_dir, is_prepared
from lofit.intervene import apply_adapters, combine
from tests.server.conftest import AUTH, BASE, SHIPPED, Peers, random_adapter

PROMPT = "Q: Can pigs fly? A:"
VOLATILE = {"id", "created", "system_fingerprint"}  # per request, or a hash of the engine config (which differs)
MESSAGES = [{"role": "user", "content": "Can pigs fly?"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}


@dataclass
class Case:
    id: str
    path: str
    body: dict
    stream: bool = True  # also sent with "stream": true (and once with usage in the stream)
    extra: dict = field(default_factory=dict)


def completion(id: str, stream: bool = True, **body: Any) -> Case:
    return Case(id, "/v1/completions", {"model": BASE, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, **body},
                stream)


def chat(id: str, stream: bool = True, **body: Any) -> Case:
    return Case(id, "/v1/chat/completions", {"model": BASE, "messages": MESSAGES, "max_tokens": 6, "temperature": 0,
                                             **body}, stream)


def token_ids(text: str) -> list[int]:
    """``text``'s token ids (placeholders when the model is not prepared: the tests then skip)."""
    from transformers import AutoTokenizer

    if not is_prepared(default_model_dir()):
        return [1, 2, 3]
    return AutoTokenizer.from_pretrained(default_model_dir())(text)["input_ids"]


CASES = [
    completion("basic"),
    completion("n=2, seeded sampling", n=2, temperature=0.8, seed=7),
    completion("logprobs=2", logprobs=2),
    completion("echo + logprobs, max_tokens 0 (prompt log-probs only)", False, echo=True, logprobs=1, max_tokens=0),
    completion("lm-eval's log-likelihood payload", False, prompt=[token_ids(PROMPT + " No")], max_tokens=1,
               logprobs=1, echo=True, seed=1234),
    completion("prompt as token ids", prompt=token_ids(PROMPT)),
    completion("a list of token-id prompts", False, prompt=[token_ids(PROMPT), token_ids("Q: Is water wet? A:")]),
    completion("a list of text prompts", False, prompt=[PROMPT, "Q: Is water wet? A:"]),
    completion("presence, frequency and repetition penalties", presence_penalty=0.5, frequency_penalty=0.5,
               repetition_penalty=1.2),
    completion("logit_bias", logit_bias={"2838": -100}),
    completion("response_format json_object", response_format={"type": "json_object"}, max_tokens=8),
    completion("stop list", stop=[",", "."]),
    completion("vLLM extras: top_k, min_p, ignore_eos, return_token_ids, prompt_logprobs", top_k=5, min_p=0.1,
               ignore_eos=True, return_token_ids=True, prompt_logprobs=1),
    completion("SDK and unknown fields (user, metadata, store, best_of)", user="u1", metadata={"k": "v"},
               store=False, best_of=1, surprise=1),
    completion("suffix (no FIM for this model)", False, suffix="!"),
    completion("empty prompt", False, prompt=""),
    completion("unknown model", False, model="nope"),
    completion("temperature out of range", False, temperature=-1),
    chat("basic"),
    chat("n=2, seeded sampling", n=2, temperature=0.8, seed=7),
    chat("logprobs + top_logprobs", logprobs=True, top_logprobs=2),
    chat("response_format json_object", response_format={"type": "json_object"}, max_tokens=8),
    chat("response_format json_schema", max_tokens=8,
         response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}),
    chat("tools with tool_choice none", tools=[TOOL], tool_choice="none"),
    chat("tools with tool_choice auto (no parser flags: refused as vLLM does)", False, tools=[TOOL]),
    chat("tools with a named tool_choice", max_tokens=12, tools=[TOOL],
         tool_choice={"type": "function", "function": {"name": "get_weather"}}),
    chat("presence, frequency and repetition penalties, logit_bias", presence_penalty=0.5, frequency_penalty=0.5,
         repetition_penalty=1.2, logit_bias={"2838": -100}),
    chat("content as a list of parts", messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                                             {"type": "text", "text": "there"}]}]),
    chat("developer role and a message name", messages=[{"role": "developer", "content": "Be brief."},
                                                       {"role": "user", "name": "bob", "content": "Hi"}]),
    chat("SDK fields (metadata, store, user)", metadata={"k": "v"}, store=False, user="u1"),
    chat("max_completion_tokens", max_completion_tokens=4),
    chat("stop", stop=["\n"]),
    chat("vLLM extras: echo, add_generation_prompt, top_k", echo=True, add_generation_prompt=True, top_k=5),
    chat("unknown model", False, model="nope"),
    chat("no messages", False, messages=[]),
    Case("tokenize", "/tokenize", {"model": BASE, "prompt": PROMPT}, False),
    Case("tokenize a chat", "/tokenize", {"model": BASE, "messages": MESSAGES, "add_generation_prompt": True}, False),
    Case("detokenize", "/detokenize", {"model": BASE, "tokens": [2838, 28, 14668]}, False),
]
STREAMED = [Case(f"{c.id}, streamed", c.path, {**c.body, "stream": True}, False) for c in CASES if c.stream]
STREAMED += [Case(f"{c.id}, streamed with usage", c.path, {**c.body, "stream": True, "stream_options": {
    "include_usage": True, "continuous_usage_stats": True}}, False) for c in CASES[:3] + CASES[18:21]]
TABLE = CASES + STREAMED


def shape(value: Any, prefix: str = "") -> set[str]:
    """The field paths of a JSON value (``a.b``, ``a[].c``)."""
    if isinstance(value, dict):
        out = set()
        for key, item in value.items():
            out.add(prefix + key)
            out |= shape(item, f"{prefix}{key}.")
        return out
    if isinstance(value, list):
        return set().union(*(shape(item, prefix.rstrip(".") + "[].") for item in value)) if value else set()
    return set()


def same(a: Any, b: Any, where: str = "$") -> None:
    """``a`` equals ``b`` but for volatile fields, floats within 1e-3."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert set(a) == set(b), f"{where}: fields {sorted(set(a) ^ set(b))} differ"
        for key in a:
            if key not in VOLATILE:
                same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{where}: {len(a)} items against {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, int | float) and isinstance(b, int | float) and math.isclose(a, b, abs_tol=1e-3), (
            f"{where}: {a!r} != {b!r}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def events(response: httpx.Response) -> list[Any]:
    """The server-sent events of a stream, as JSON (``[DONE]`` kept as the string), each choice's events
    together (with ``n`` > 1 the choices' chunks interleave as the engine happens to finish them)."""
    out = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            out.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))

    def choice(event: Any) -> float:
        choices = event.get("choices") if isinstance(event, dict) else None
        return choices[0]["index"] if choices else float("inf")

    return sorted(out, key=choice)


def send(url: str, case: Case, headers: dict[str, str]) -> tuple[int, Any]:
    response = httpx.post(url + case.path, json=case.body, headers=headers, timeout=300)
    if case.body.get("stream") and response.status_code == 200:
        assert response.headers["content-type"].startswith("text/event-stream")
        return 200, events(response)
    return response.status_code, response.json()


@pytest.fixture(scope="module")
def answers(peers: Peers) -> Iterator[dict[str, tuple[tuple[int, Any], tuple[int, Any]]]]:
    """Every case of the table sent to both servers, one after the other: ``{id: (vLLM's, ours)}``."""
    yield {case.id: (send(peers.vllm, case, {}), send(peers.lofit.url, case, AUTH)) for case in TABLE}


@pytest.mark.parametrize("case", TABLE, ids=[c.id for c in TABLE])
def test_the_answer_equals_vllm_serves(answers, case: Case):
    (vllm_status, vllm_body), (our_status, our_body) = answers[case.id]
    assert our_status == vllm_status, (our_body, vllm_body)
    assert shape(our_body) == shape(vllm_body) if isinstance(our_body, dict) else True
    same(our_body, vllm_body)


def test_the_table_covers_what_real_clients_send():
    """Each option of the issue's list is in the table, streamed and not, on both routes."""
    ids = {c.id for c in TABLE}
    assert len(TABLE) >= 60
    for route in ("/v1/completions", "/v1/chat/completions"):
        assert any(c.path == route and c.body.get("stream") for c in TABLE)
        assert any(c.path == route and "stream_options" in c.body for c in TABLE)
    assert {"n=2, seeded sampling", "logprobs + top_logprobs", "content as a list of parts",
            "developer role and a message name", "lm-eval's log-likelihood payload"} <= ids


# -- with an adapter: the transformers reference path ----------------------------------------------------------

@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(default_model_dir())


def reference_run(reference, ids: list[int], mix: list[tuple[Any, float]], new_tokens: int) -> tuple[list[int],
                                                                                                  list[float]]:
    """Greedy tokens after ``ids`` and the log-prob of each prompt token (from the second on), steered by ``mix``."""
    model, _ = reference
    steering = combine(mix) if mix else None
    with torch.no_grad(), apply_adapters(model, steering):
        logits = model(torch.tensor([ids])).logits[0].float()
        prompt_logprobs = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(ids):].tolist(), prompt_logprobs.tolist()


STEERED = [  # (request fields, the adapter mix they mean)
    ({"model": "truthfulqa"}, [("truthfulqa", 1.0)]),
    ({"model": "truthfulqa", "adapter_scale": 2.0}, [("truthfulqa", 2.0)]),
    ({"model": BASE, "adapters": {"truthfulqa": 1.0, "random4": -0.5}}, [("truthfulqa", 1.0), ("random4", -0.5)]),
    ({"model": BASE, "vllm_xargs": {"adapter": "random4", "adapter_scale": 1.5}}, [("random4", 1.5)]),
]


@pytest.mark.parametrize(("fields", "mix"), STEERED, ids=[json.dumps(f) for f, _ in STEERED])
def test_steered_tokens_and_prompt_logprobs_equal_the_reference(peers: Peers, reference, fields, mix):
    adapters = {"truthfulqa": load_adapter(SHIPPED), "random4": random_adapter("random4", seed=1)}
    ids = reference[1](PROMPT)["input_ids"]
    want_tokens, want_logprobs = reference_run(reference, ids, [(adapters[n], w) for n, w in mix], 8)
    body = {"prompt": ids, "max_tokens": 8, "temperature": 0, "echo": True, "logprobs": 0, "return_token_ids": True,
            **fields}
    response = httpx.post(f"{peers.lofit.url}/v1/completions", json=body, headers=AUTH, timeout=120)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model"] == fields["model"]
    choice = answer["choices"][0]
    assert choice["token_ids"] == want_tokens
    echoed = choice["logprobs"]["token_logprobs"][1:len(ids)]
    assert max(abs(a - b) for a, b in zip(echoed, want_logprobs, strict=True)) < 1e-3
    unsteered = {**{k: v for k, v in body.items() if k not in fields}, "model": BASE}
    plain = httpx.post(f"{peers.lofit.url}/v1/completions", json=unsteered, headers=AUTH, timeout=120)
    assert plain.json()["choices"][0]["token_ids"] != want_tokens, "the adapter changes the output"


def test_every_streamed_chunk_names_the_adapter(peers: Peers):
    for path, body in (("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions", {"messages": MESSAGES})):
        response = httpx.post(peers.lofit.url + path, headers=AUTH, timeout=120, json={
            "model": "truthfulqa", "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}, **body})
        chunks = [e for e in events(response) if e != "[DONE]"]
        assert chunks and all(chunk["model"] == "truthfulqa" for chunk in chunks)
        assert chunks[-1]["usage"]["completion_tokens"] == 4
