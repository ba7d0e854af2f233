"""The vLLM engine behind the server, and one generation from a prompt to its outputs.

The engine is vLLM's ``AsyncLLM`` serving the model with its LoFiT wrapper (the plugin does admission,
``cache_salt`` and the self-test inside the engine). :func:`generate` is shared by ``/generate`` and the
OpenAI routes: it checks the prompt length, resolves the adapter choice against the registry, and yields
vLLM's ``RequestOutput`` objects; a caller that stops iterating (a client that went away) aborts the
request in the engine.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from lofit.vllm.offline import lofit_engine_args
from lofit.vllm.salt import Combination
from server.registry import AdapterRegistry
from server.settings import Settings

HTTP_REQUEST_ID: ContextVar[str] = ContextVar("http_request_id", default="-")  # set per HTTP request


class PromptTooLong(ValueError):
    """The prompt (plus ``max_tokens``) does not fit the server's limits."""


def start_engine(settings: Settings) -> Any:
    """Build ``AsyncLLM`` for the settings (blocks until the engine core is up)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.platforms import current_platform
    from vllm.v1.engine.async_llm import AsyncLLM

    extra = dict(settings.engine_args)
    if current_platform.is_cpu():
        if settings.kv_cache_gib is not None:  # the flag wins over the environment
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(settings.kv_cache_gib)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        extra.setdefault("gpu_memory_utilization", 0.1)
    args = lofit_engine_args(settings.model, dtype=settings.dtype, max_model_len=settings.max_model_len,
                             max_num_seqs=settings.max_num_seqs, served_model_name=settings.base_name,
                             disable_log_stats=True, **extra)
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**args))


@dataclass
class Choice:
    """What a request applies: ``weights`` ``{name: weight}`` (``None`` = base model) and its combination."""

    weights: dict[str, float] | None
    combination: Combination | None

    @property
    def label(self) -> str:
        """The adapter label used in responses and metrics."""
        if self.weights is None:
            return "base"
        if len(self.weights) == 1:
            [(name, weight)] = self.weights.items()
            return name if weight == 1.0 else f"{name}*{weight:g}"
        return "+".join(f"{n}*{w:g}" for n, w in sorted(self.weights.items()))

    @property
    def extra_args(self) -> dict[str, Any] | None:
        return None if self.weights is None else {"lofit_adapters": dict(self.weights)}


def choose(registry: AdapterRegistry, weights: dict[str, float] | None) -> Choice:
    """Resolve a request's adapters (raises ``UnknownAdapter``); all-zero weights mean the base model."""
    if weights is not None:
        weights = {n: float(w) for n, w in weights.items() if float(w) != 0.0} or None
    if weights is None:
        return Choice(None, None)
    return Choice(weights, registry.resolve(weights))


def sampling_params(fields: Any, max_tokens: int, stream: bool, choice: Choice, logprobs: int | None = None) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        max_tokens=max_tokens, temperature=fields.temperature, top_p=fields.top_p, top_k=fields.top_k,
        seed=fields.seed, stop=fields.stop, ignore_eos=fields.ignore_eos, logprobs=logprobs,
        extra_args=choice.extra_args,
        output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY)


def check_length(settings: Settings, prompt_ids: list[int], max_tokens: int) -> None:
    if not prompt_ids:
        raise PromptTooLong("the prompt is empty")
    if len(prompt_ids) > settings.prompt_limit:
        raise PromptTooLong(f"the prompt has {len(prompt_ids)} tokens; this server takes at most "
                            f"{settings.prompt_limit}")
    if len(prompt_ids) + max_tokens > settings.max_model_len:
        raise PromptTooLong(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                            f"model length {settings.max_model_len}")


async def generate(state: Any, prompt_ids: list[int], params: Any, choice: Choice,
                   route: str) -> AsyncIterator[Any]:
    """Run one request in the engine, yielding ``RequestOutput`` objects; records metrics and usage."""
    from vllm.inputs import TokensPrompt

    request_id = f"{HTTP_REQUEST_ID.get()}-{uuid.uuid4().hex[:8]}"  # the HTTP request id, in vLLM's logs too
    started, first = time.perf_counter(), None
    metrics = state.metrics
    metrics.waiting.inc()
    state.registry.count(choice.weights or {})
    status = "500"
    try:
        async for output in state.engine.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, request_id):
            if first is None and output.outputs and output.outputs[0].token_ids:
                first = time.perf_counter()
                metrics.waiting.dec()
                metrics.running.inc()
                metrics.first_token.labels(choice.label).observe(first - started)
            if output.outputs:
                metrics.output_tokens.labels(choice.label).inc(len(output.outputs[0].token_ids))
            yield output
        status = "200"
    except BaseException as exc:
        status = "499" if isinstance(exc, GeneratorExit | asyncio.CancelledError) else "500"
        raise
    finally:
        (metrics.running if first is not None else metrics.waiting).dec()
        metrics.requests.labels(choice.label, route, status).inc()
        metrics.latency.labels(choice.label, route).observe(time.perf_counter() - started)
