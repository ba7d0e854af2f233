"""The inventory of vLLM internals ``lofit-serve`` relies on (server/vllm_api.py) still matches the installed vLLM.

Fast (no engine): each name exists with the parameters our code passes or overrides, the app-state attributes
our lifespan reads are the ones vLLM's ``init_app_state`` sets, and the patches behave — so a vLLM upgrade
that moves one of them fails here, by name, rather than as a 500 somewhere in the server suite.
"""

from __future__ import annotations

import asyncio
import inspect
from types import SimpleNamespace

import pytest

from server import vllm_api


def params_of(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_every_inventoried_name_is_importable_from_vllm():
    for name in vllm_api.__all__:
        assert getattr(vllm_api, name, None) is not None, name


def test_the_serving_hook_target_takes_the_request_and_the_mm_flag():
    assert params_of(vllm_api.BaseServing._maybe_get_adapters)[:3] == ["self", "request", "supports_default_mm_loras"]


def test_init_app_state_sets_the_attributes_the_lifespan_reads():
    source = inspect.getsource(vllm_api.init_app_state)
    for attr in ("openai_serving_models", "online_renderer"):
        assert f"state.{attr}" in source, attr


def test_the_models_object_holds_base_paths_and_lora_requests():
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

    init = inspect.getsource(OpenAIServingModels.__init__)
    assert "self.base_model_paths" in init and "self.lora_requests" in init
    assert inspect.iscoroutinefunction(OpenAIServingModels.show_available_models)


def test_the_renderers_have_the_methods_we_wrap():
    from vllm.renderers.hf import HfRenderer
    from vllm.renderers.online_renderer import OnlineRenderer

    assert params_of(HfRenderer.render_messages)[1:3] == ["messages", "params"]
    assert params_of(HfRenderer.render_messages_async)[1:3] == ["messages", "params"]
    for name in ("render_chat", "render_responses", "render_completion"):
        assert inspect.iscoroutinefunction(getattr(OnlineRenderer, name)), name


def test_async_llm_methods_we_override_take_the_arguments_we_pass():
    from vllm.v1.engine.async_llm import AsyncLLM

    assert params_of(AsyncLLM.add_request)[:6] == ["self", "request_id", "prompt", "params", "arrival_time",
                                                   "lora_request"]
    generate = params_of(AsyncLLM.generate)
    assert generate[:4] == ["self", "prompt", "sampling_params", "request_id"] and "lora_request" in generate
    assert "self.output_processor" in inspect.getsource(AsyncLLM.__init__)


def test_the_lora_adapter_bodies_are_vllms():
    assert set(vllm_api.LoadLoRAAdapterRequest.model_fields) >= {"lora_name", "lora_path"}
    assert set(vllm_api.UnloadLoRAAdapterRequest.model_fields) >= {"lora_name"}


def test_the_arg_parser_knows_the_flags_lofit_serve_forwards():
    parser = vllm_api.make_arg_parser(vllm_api.FlexibleArgumentParser())
    args = parser.parse_args(["--served-model-name", "base", "--api-key", "k", "--max-model-len", "512"])
    assert args.served_model_name == ["base"] and args.api_key == ["k"] and args.max_model_len == 512


def test_the_steering_hook_asks_the_resolver_and_leaves_other_servers_alone():
    vllm_api.install_steering_hook()
    hook = vllm_api.BaseServing._maybe_get_adapters
    vllm_api.install_steering_hook()  # idempotent: no second wrapper
    assert vllm_api.BaseServing._maybe_get_adapters is hook

    seen = []
    resolver = SimpleNamespace(for_request=lambda request: seen.append(request) or "steering")
    steered = SimpleNamespace(models=SimpleNamespace(lofit_resolver=resolver))
    request = SimpleNamespace(model="truthfulqa")
    assert hook(steered, request) == "steering" and seen == [request]

    lora = object()  # vLLM's own code where no resolver is attached: its lora_requests, then its base check
    plain = SimpleNamespace(models=SimpleNamespace(lora_requests={"sql": lora}),
                            _is_model_supported=lambda name: name == "base")
    assert hook(plain, SimpleNamespace(model="sql")) is lora
    assert hook(plain, SimpleNamespace(model="base")) is None


def test_the_render_guard_turns_index_and_key_errors_into_vllms_400():
    from vllm.exceptions import VLLMValidationError

    class Renderer:
        async def render_chat(self, *args, **kwargs):
            return [][0]

        async def render_responses(self, *args, **kwargs):
            return {}["input"]

        async def render_completion(self, *args, **kwargs):
            return "fine"

    renderer = Renderer()
    vllm_api.install_render_guard(renderer)
    vllm_api.install_render_guard(renderer)  # idempotent
    for name in ("render_chat", "render_responses"):
        with pytest.raises(VLLMValidationError, match="malformed request input"):
            asyncio.run(getattr(renderer, name)())
    assert asyncio.run(renderer.render_completion()) == "fine"
