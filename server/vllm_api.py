"""Every piece of vLLM's API server that ``lofit-serve`` relies on, in one place (vLLM 0.32).

The server *is* vLLM's OpenAI server — its app, routes, request models, handlers, error bodies and metrics —
with the steering parts added. What it takes from vLLM's ``vllm.entrypoints`` beyond the documented
``EngineClient`` protocol is imported or patched here and nowhere else, and ``tests/server/test_vllm_api.py``
checks that each still exists, so an upgrade that moves one fails in one spot:

* ``make_arg_parser`` — the ``vllm serve`` flags (``launchers/cli_args.py``), which ``lofit-serve`` accepts too;
* ``build_app`` / ``init_app_state`` — the FastAPI app and its serving objects (``launchers/app.py``,
  ``launchers/api_server/app_state.py``), as ``vllm serve`` builds them;
* ``BaseServing._maybe_get_adapters`` (``serve/engine/serving.py``) — where every vLLM route turns ``model``
  into its ``LoRARequest``; :func:`install_steering_hook` makes it return the request's
  :class:`~server.steering.Steering` instead, so the steering fields of the body are read too;
* ``OpenAIServingModels.lora_requests`` / ``base_model_paths`` (``openai/models/serving.py``) — the names vLLM
  accepts as ``model`` and lists on ``GET /v1/models``;
* ``renderer.render_messages`` / ``render_messages_async`` (``renderers/hf.py``: a chat rendered to
  ``(conversation, {"prompt": text})``) — :func:`install_plain_chat_content` tokenises message content as plain
  text (:mod:`server.chat_tokens`);
* ``OnlineRenderer.render_chat`` / ``render_responses`` / ``render_completion`` (``renderers/online_renderer.py``)
  — :func:`install_render_guard` turns the ``IndexError``/``KeyError`` vLLM 0.32 raises on some malformed
  inputs (a ``/v1/responses`` message item with an empty ``content`` list) into its 400 instead of a 500;
* ``LoadLoRAAdapterRequest`` / ``UnloadLoRAAdapterRequest`` (``serve/lora/protocol.py``) — the bodies of
  ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``, which :mod:`server.api_adapters` serves;
* ``with_cancellation`` (``serve/utils/api_utils.py``), ``sanitize_message`` and ``create_error_response``
  (``serve/exception_handling``), ``get_prometheus_registry`` (``v1/metrics/prometheus.py``).
"""

from __future__ import annotations

from typing import Any

from vllm.entrypoints.launchers.api_server.app_state import init_app_state
from vllm.entrypoints.launchers.app import build_app
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.entrypoints.serve.engine.serving import BaseServing
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.entrypoints.serve.exception_handling.utils import sanitize_message
from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from vllm.entrypoints.serve.utils.api_utils import with_cancellation
from vllm.exceptions import VLLMValidationError
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.v1.metrics.prometheus import get_prometheus_registry

__all__ = ["BaseServing", "FlexibleArgumentParser", "LoadLoRAAdapterRequest", "UnloadLoRAAdapterRequest", "build_app",
           "create_error_response", "get_prometheus_registry", "init_app_state", "install_plain_chat_content",
           "install_render_guard", "install_steering_hook", "make_arg_parser", "sanitize_message",
           "with_cancellation"]

RESOLVER_ATTR = "lofit_resolver"  # set on the OpenAIServingModels instance by the server
_MARK = "_lofit_steering"


def install_steering_hook() -> None:
    """Patch ``BaseServing._maybe_get_adapters`` once: where the serving object's models carry a
    :class:`~server.steering.SteeringResolver` (attribute ``lofit_resolver``), the request's steering comes
    from it (raising vLLM's 400/404 errors for a bad choice); elsewhere vLLM's own code runs."""
    original = BaseServing._maybe_get_adapters
    if getattr(original, _MARK, False):
        return

    def _maybe_get_adapters(self: Any, request: Any, supports_default_mm_loras: bool = False) -> Any:
        resolver = getattr(self.models, RESOLVER_ATTR, None)
        if resolver is None:
            return original(self, request, supports_default_mm_loras)
        return resolver.for_request(request)

    setattr(_maybe_get_adapters, _MARK, True)
    BaseServing._maybe_get_adapters = _maybe_get_adapters


def install_plain_chat_content(renderer: Any) -> None:
    """Wrap this renderer's ``render_messages`` and ``render_messages_async`` (instance attributes, this engine
    only) so that chat message content is tokenised as plain text (:mod:`server.chat_tokens`)."""
    from server.chat_tokens import placeholders_for, special_strings, with_plain_content

    tokenizer = renderer.get_tokenizer()
    specials = special_strings(tokenizer)
    sync, async_ = renderer.render_messages, renderer.render_messages_async

    def render_messages(messages: Any, params: Any) -> Any:
        conversation, prompt = sync(messages, params)
        marked = placeholders_for(conversation, messages, prompt, specials)
        if marked is not None:  # render once more with placeholders: the skeleton tells template from content
            prompt = with_plain_content(tokenizer, prompt, sync(marked[0], params)[1], marked[1])
        return conversation, prompt

    async def render_messages_async(messages: Any, params: Any) -> Any:
        conversation, prompt = await async_(messages, params)
        marked = placeholders_for(conversation, messages, prompt, specials)
        if marked is not None:
            prompt = with_plain_content(tokenizer, prompt, (await async_(marked[0], params))[1], marked[1])
        return conversation, prompt

    renderer.render_messages, renderer.render_messages_async = render_messages, render_messages_async


def install_render_guard(online_renderer: Any) -> None:
    """Wrap the renderer's request rendering (instance attributes) so that an ``IndexError`` or ``KeyError``
    raised while rendering a request — malformed input that vLLM 0.32's request models accept but its
    renderer does not (found by fuzzing ``/v1/responses``) — is vLLM's 400 ``VLLMValidationError``, not a 500."""
    for name in ("render_chat", "render_responses", "render_completion"):
        original = getattr(online_renderer, name, None)
        if original is None or getattr(original, _MARK, False):
            continue

        async def guarded(*args: Any, __original: Any = original, **kwargs: Any) -> Any:
            try:
                return await __original(*args, **kwargs)
            except (IndexError, KeyError) as exc:
                raise VLLMValidationError(f"malformed request input: {type(exc).__name__} while rendering it "
                                          f"({exc})") from exc

        setattr(guarded, _MARK, True)
        setattr(online_renderer, name, guarded)
