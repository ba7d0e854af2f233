"""The engine client of the API server: vLLM's ``AsyncLLM`` with each request's steering applied.

Every route — vLLM's OpenAI layer and ``POST /generate`` alike — reaches the engine through
:meth:`SteeredAsyncLLM.generate` / :meth:`SteeredAsyncLLM.add_request` (vLLM's ``EngineClient`` protocol,
``vllm/engine/protocol.py``). There:

* the request's :class:`~server.steering.Steering` (passed where vLLM passes a ``LoRARequest``) becomes the
  plugin's ``SamplingParams.extra_args`` (``lofit_adapters``; :mod:`lofit.vllm.contract`), and the
  ``LoRARequest`` slot is cleared; a request that chose its adapters only in ``vllm_xargs`` and came through a
  route that does not resolve them is resolved here, by the same rules;
* the names are held (:class:`Admissions`) until the request has been sent to the engine core, so an unload
  of one of them, sent afterwards on the same queue, cannot overtake it: the engine admits every request that
  the API server resolved (no "adapter vanished" refusal inside the engine);
* ``--max-prompt-tokens`` is checked (HTTP 400, as vLLM's own length check);
* each request is recorded in the ``lofit_*`` metrics from the engine's own timings
  (:class:`server.metrics.Metrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncGenerator, Iterator
from contextvars import ContextVar
from typing import Any

from vllm.exceptions import VLLMNotFoundError, VLLMValidationError
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

from lofit.vllm.contract import ADAPTERS_KEY, reserved_salt_error
from server.steering import STEERING_KEYS, Steering, SteeringResolver

ROUTE: ContextVar[str] = ContextVar("lofit_route", default="engine")  # the HTTP route, set by the middleware


class Admissions:
    """Adapter names held by requests between their resolution and their hand-off to the engine core."""

    def __init__(self) -> None:
        self._held: Counter[str] = Counter()
        self._changed = asyncio.Condition()

    @contextlib.contextmanager
    def hold(self, names: list[str]) -> Iterator[None]:
        self._held.update(names)
        try:
            yield
        finally:
            self._held.subtract(names)
            if any(self._held[n] <= 0 for n in names):
                asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_released(self, name: str) -> None:
        """Return once no request holds ``name`` (new requests can no longer resolve it by then)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._held[name] <= 0)


class SteeredAsyncLLM(AsyncLLM):
    """``AsyncLLM`` that applies :class:`~server.steering.Steering`; call :meth:`attach` before serving."""

    resolver: SteeringResolver | None = None
    admissions: Admissions | None = None
    metrics: Any = None
    prompt_limit: int | None = None
    count: Any = None

    def attach(self, resolver: SteeringResolver, metrics: Any, prompt_limit: int | None,
               count: Any = None) -> None:
        """Serve with ``resolver``; record in ``metrics``; refuse prompts over ``prompt_limit`` tokens;
        ``count(weights)`` is told of every steered request admitted."""
        self.resolver, self.metrics, self.prompt_limit, self.count = resolver, metrics, prompt_limit, count
        self.admissions = Admissions()
        self._adapters_of: dict[str, list[str]] = {}  # engine request id -> the adapters it uses

    def steering_of(self, lora_request: Any, params: Any) -> Steering | None:
        """The request's steering: the one its route resolved, else the one its ``vllm_xargs`` give."""
        if isinstance(lora_request, Steering):
            return lora_request
        extra = getattr(params, "extra_args", None) or {}
        if self.resolver is not None and any(k in STEERING_KEYS for k in extra):
            return self.resolver.resolve(None, None, extra)
        return None

    async def add_request(self, request_id: str, prompt: Any, params: Any, arrival_time: float | None = None,
                          lora_request: Any = None, *args: Any, **kwargs: Any) -> Any:
        steering = self.steering_of(lora_request, params)
        if steering is not None or isinstance(getattr(params, "extra_args", None), dict):
            params = _with_steering(params, steering)
            lora_request = None
        self._check_prompt(prompt)
        names = sorted(steering.weights) if steering is not None else []
        if not names or self.admissions is None:
            return await super().add_request(request_id, prompt, params, arrival_time, lora_request, *args,
                                             **kwargs)
        with self.admissions.hold(names):
            missing = sorted(set(names) - set(self.resolver.loaded()))
            if missing:  # unloaded since the route resolved it
                raise VLLMNotFoundError(f"adapter(s) not loaded: {', '.join(missing)}")
            queue = await super().add_request(request_id, prompt, params, arrival_time, lora_request, *args,
                                              **kwargs)
        if len(self._adapters_of) > 2 * len(self.output_processor.request_states) + 64:
            self.live_requests()  # prunes finished requests
        self._adapters_of[queue.request_id] = names
        if self.count is not None:
            self.count(steering.weights)
        return queue

    def live_requests(self) -> list[tuple[list[str], bool]]:
        """``(adapter names, running)`` for every request in the engine now (``[]``: unsteered); running means
        scheduled at least once (from vLLM's per-request stats, which need stats on)."""
        out, live = [], set()
        for req_id, state in list(self.output_processor.request_states.items()):
            key = state.parent_req.request_id if state.parent_req is not None else req_id
            live.add(key)
            out.append((self._adapters_of.get(key, []), state.stats is not None and state.stats.scheduled_ts > 0))
        for key in [k for k in self._adapters_of if k not in live]:
            del self._adapters_of[key]
        return out

    def generate(self, prompt: Any, sampling_params: Any, request_id: str, *, lora_request: Any = None,
                 **kwargs: Any) -> AsyncGenerator[Any, None]:
        """``AsyncLLM.generate``, with the request's choice and prompt checked *now*, when vLLM's serving layer
        creates the generator (so a stream that would fail them is refused with its 4xx before it starts)."""
        steering = self.steering_of(lora_request, sampling_params)
        self._check_prompt(prompt)
        if steering is not None and self.resolver is not None:
            missing = sorted(set(steering.weights) - set(self.resolver.loaded()))
            if missing:
                raise VLLMNotFoundError(f"adapter(s) not loaded: {', '.join(missing)}")
        return self._generate(prompt, sampling_params, request_id, steering or lora_request, ROUTE.get(), kwargs)

    async def _generate(self, prompt: Any, sampling_params: Any, request_id: str, lora_request: Any, route: str,
                        kwargs: dict[str, Any]) -> AsyncGenerator[Any, None]:
        steering = lora_request if isinstance(lora_request, Steering) else None
        delta = getattr(sampling_params, "output_kind", None) == RequestOutputKind.DELTA
        record = self.metrics.start(steering, route, delta) if self.metrics is not None else None
        inner = super().generate(prompt, sampling_params, request_id, lora_request=lora_request, **kwargs)
        try:
            async for output in inner:
                if record is not None:
                    record.output(output)
                yield output
            if record is not None:
                record.finish("finished")
        except (asyncio.CancelledError, GeneratorExit):
            if record is not None:
                record.finish("aborted")
            raise
        except BaseException:
            if record is not None:
                record.finish("error")
            raise
        finally:
            await inner.aclose()

    def _check_prompt(self, prompt: Any) -> None:
        refused = reserved_salt_error(prompt.get("cache_salt") if isinstance(prompt, dict) else None)
        if refused:  # the engine core would refuse it too, but as a 500
            raise VLLMValidationError(refused, parameter="cache_salt")
        ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
        if self.prompt_limit is not None and ids is not None and len(ids) > self.prompt_limit:
            raise VLLMValidationError(f"the prompt has {len(ids)} tokens; this server takes at most "
                                      f"{self.prompt_limit} (--max-prompt-tokens)", parameter="prompt")


def _with_steering(params: Any, steering: Steering | None) -> Any:
    """``params`` with the client's steering keys replaced by the plugin's ``lofit_adapters`` (a copy)."""
    extra = {k: v for k, v in (params.extra_args or {}).items() if k not in STEERING_KEYS}
    if steering is not None and steering.weights:
        extra[ADAPTERS_KEY] = dict(steering.weights)
    params = params.clone()
    params.extra_args = extra or None
    return params

