"""The steering rules of :mod:`server.steering`: what a request's ``model``, body fields and ``vllm_xargs`` choose,
and the errors (vLLM's 400 and 404) for everything else."""

from __future__ import annotations

import pytest
from vllm.exceptions import VLLMNotFoundError, VLLMValidationError

from server.steering import Steering, SteeringResolver

BASE = "SmolLM2-135M-Instruct"


@pytest.fixture
def resolver() -> SteeringResolver:
    return SteeringResolver([BASE], lambda: {"truthfulqa", "mquake"})


def weights(steering: Steering | None) -> dict[str, float] | None:
    return None if steering is None else steering.weights


@pytest.mark.parametrize(("model", "fields", "xargs", "expected", "name"), [
    (BASE, None, None, None, None),
    (None, None, None, None, None),
    ("truthfulqa", None, None, {"truthfulqa": 1.0}, "truthfulqa"),
    ("truthfulqa", {"adapter_scale": 2.5}, None, {"truthfulqa": 2.5}, "truthfulqa"),
    ("truthfulqa", None, {"adapter_scale": -1}, {"truthfulqa": -1.0}, "truthfulqa"),
    ("truthfulqa", {"adapter": "truthfulqa"}, None, {"truthfulqa": 1.0}, "truthfulqa"),
    ("truthfulqa", {"adapters": {"truthfulqa": 1, "mquake": 0.5}}, None, {"truthfulqa": 1.0, "mquake": 0.5},
     "truthfulqa"),
    (BASE, {"adapter": "mquake", "adapter_scale": 0.5}, None, {"mquake": 0.5}, BASE),
    (BASE, {"adapters": {"mquake": 2}}, None, {"mquake": 2.0}, BASE),
    (BASE, None, {"adapters": ["mquake:2", "truthfulqa:-1"]}, {"mquake": 2.0, "truthfulqa": -1.0}, BASE),
    (BASE, None, {"lofit_adapter": "mquake", "lofit_scale": 3}, {"mquake": 3.0}, BASE),
    (BASE, None, {"adapter": "mquake", "unrelated": 1}, {"mquake": 1.0}, BASE),
    ("truthfulqa", {"adapter_scale": 0}, None, {}, "truthfulqa"),  # zero weights drop out: the base model
    (BASE, {"adapters": {"mquake": 0}}, None, {}, BASE),
])
def test_a_choice_resolves_to_its_weights_and_response_name(resolver, model, fields, xargs, expected, name):
    steering = resolver.resolve(model, fields, xargs)
    assert weights(steering) == expected
    if steering is not None:
        assert steering.lora_name == name


@pytest.mark.parametrize(("model", "fields", "xargs", "message"), [
    ("truthfulqa", {"adapter": "mquake"}, None, "does not include it"),
    ("truthfulqa", {"adapters": {"mquake": 1}}, None, "does not include it"),
    (BASE, {"adapter_scale": 2}, None, "needs an adapter"),
    (BASE, {"adapter": "mquake", "adapters": {"mquake": 1}}, None, "not both"),
    (BASE, {"adapters": {"mquake": 1}, "adapter_scale": 2}, None, "goes with 'adapter'"),
    (BASE, {"adapter": "mquake"}, {"adapter": "mquake"}, "not both"),
    (BASE, None, {"adapter": "mquake", "lofit_adapter": "mquake"}, "given twice"),
    (BASE, {"adapter": "../etc"}, None, "invalid adapter name"),
    (BASE, {"adapter": 3}, None, "invalid adapter name"),
    (BASE, {"adapters": {"mquake": 101}}, None, "within [-100, 100]"),
    (BASE, {"adapters": {"mquake": "x"}}, None, "finite number"),
    (BASE, {"adapters": {"mquake": float("nan")}}, None, "finite number"),
    (BASE, {"adapters": []}, None, "non-empty"),
    (BASE, {"adapters": {f"a{i}": 1 for i in range(17)}}, None, "1 to 16"),
    (BASE, {"adapter": "mquake", "adapter_scale": True}, None, "finite number"),
])
def test_a_malformed_choice_is_a_400(resolver, model, fields, xargs, message):
    with pytest.raises(VLLMValidationError, match=message.replace("[", r"\[")):
        resolver.resolve(model, fields, xargs)


@pytest.mark.parametrize(("model", "fields"), [("nope", None), (BASE, {"adapter": "nope"}),
                                               ("truthfulqa", {"adapters": {"truthfulqa": 1, "nope": 1}})])
def test_an_unknown_model_or_adapter_is_a_404(resolver, model, fields):
    with pytest.raises(VLLMNotFoundError, match="nope"):
        resolver.resolve(model, fields)


def test_steering_labels_name_the_mix():
    assert Steering.of(BASE, {}).label is None
    assert Steering.of(BASE, {"a": 1.0}).label == "a"
    assert Steering.of(BASE, {"a": 0.5}).label == "a*0.5"
    assert Steering.of(BASE, {"b": 1.0, "a": 2.0}).label == "a*2+b*1"
