"""Engine-side LoFiT (the engine-core process): admission, prefix-cache salt, and the start-up checks.

Every request passes :func:`admit` when the engine core turns it into a scheduler ``Request`` — before its
KV block hashes exist. A steered request is checked against the adapters loaded now, stamped with the
exact content hashes it will use (``extra_args["lofit_resolved"]``), and its ``cache_salt`` becomes the
fingerprint of that content (joined with any client salt). So a client that forgets the salt cannot
poison the prefix cache, an unknown adapter is a request error rather than a crash in the forward pass,
and reloading a name never mixes old KV with new content.

At start-up the engine refuses to run a LoFiT model unless every worker reports its runner's hook
installed, and then runs a self-test through the real scheduler and runner: a strongly steered request
must change the logits, and an unsteered request next to it must not.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import numpy as np

from lofit.vllm.requests import RESOLVED_KEY, requested_weights
from lofit.vllm.salt import SALT_PREFIX, Combination, CombinationError, combine_salt
from lofit.vllm.worker import SELF_TEST_ADAPTER

logger = logging.getLogger("vllm.lofit")  # under vLLM's logger, so it shows in vLLM's logs

_MARK = "_lofit_wrapped"
_ATTR = "_lofit_adapters"  # on the EngineCore: {name: content_sha256}, or None for a non-LoFiT model


class AdmissionError(ValueError):
    """A request the engine refuses: malformed LoFiT arguments, an unknown adapter, a reserved salt."""


class SelfTestError(RuntimeError):
    """The engine's steering self-test failed: the engine must not serve."""


def admit(loaded: dict[str, str] | None, extra_args: dict[str, Any] | None,
          client_salt: str | None) -> tuple[dict[str, Any] | None, str | None]:
    """``(extra_args, cache_salt)`` for a request, given the adapters loaded now (``None``: not a LoFiT model).

    Raises :class:`AdmissionError` for anything that must not reach the workers.
    """
    if client_salt and client_salt.startswith(SALT_PREFIX):
        raise AdmissionError(f"cache_salt must not start with {SALT_PREFIX!r}: that namespace is LoFiT's own")
    try:
        weights = requested_weights(extra_args)
    except CombinationError as exc:
        raise AdmissionError(f"invalid LoFiT adapter request: {exc}") from exc
    extra_args = None if extra_args is None else {k: v for k, v in extra_args.items() if k != RESOLVED_KEY}
    if weights is None:
        return extra_args, client_salt
    if loaded is None:
        raise AdmissionError("this engine does not serve a LoFiT model wrapper; start it with "
                             "hf_overrides={'architectures': ['Lofit<Architecture>']} to use adapters")
    unknown = sorted(set(weights) - set(loaded))
    if unknown:
        raise AdmissionError(f"unknown adapter(s) {unknown}; loaded: {sorted(loaded)}")
    try:
        combo = Combination.of({name: (loaded[name], weight) for name, weight in weights.items()})
    except CombinationError as exc:
        raise AdmissionError(f"invalid LoFiT adapter request: {exc}") from exc
    return {**extra_args, RESOLVED_KEY: combo.as_list()}, combine_salt(combo.cache_salt, client_salt)


def record_rpc(loaded: dict[str, str] | None, method: Any, args: tuple, kwargs: dict | None, results: list) -> None:
    """Keep the engine's ``{name: content_sha256}`` in step with adapter loads and unloads on the workers."""
    if loaded is None or not isinstance(method, str):
        return
    if method == "lofit_load":
        loaded[results[0]["name"]] = results[0]["content_sha256"]
    elif method == "lofit_unload":
        loaded.pop(args[0] if args else (kwargs or {})["name"], None)


# -- start-up -------------------------------------------------------------------------------------------


def check_workers(core: Any) -> dict[str, str] | None:
    """For a LoFiT model: every worker has a bank and a hooked runner; returns the loaded adapters."""
    from lofit.vllm.plugin import WRAPPERS

    architectures = core.vllm_config.model_config.architectures or []
    if not any(arch in WRAPPERS for arch in architectures):
        return None
    statuses = core.model_executor.collective_rpc("lofit_status")
    broken = [s for s in statuses if not (s["bank"] and s["hook"])]
    if broken:
        raise SelfTestError(
            "LoFiT cannot tell that its steering hook is installed on the active model runner "
            f"({broken[0]['runner']} runner, {broken[0]['class']}); refusing to start rather than serve "
            "without steering. Supported: vLLM 0.32 V1 and V2 model runners.")
    loaded = dict(core.model_executor.collective_rpc("lofit_list")[0])
    logger.info("LoFiT: %s runner hook installed on %d worker(s); adapters loaded: %s",
                statuses[0]["runner"], len(statuses), sorted(loaded) or "none")
    return loaded


def _top_logprobs(output: Any) -> dict[int, float]:
    lists = output.new_logprobs
    ids, values = np.asarray(lists.logprob_token_ids[0]).tolist(), np.asarray(lists.logprobs[0]).tolist()
    return dict(zip(ids, values, strict=True))


def _run(core: Any, requests: dict[str, str | None], prompt: list[int], num_logprobs: int) -> dict[str, dict]:
    """Run one-token greedy requests ``{id: adapter name or None}`` together; each one's top log-probs."""
    from vllm import SamplingParams
    from vllm.v1.engine import EngineCoreRequest

    for req_id, adapter in requests.items():
        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=num_logprobs,
                                extra_args=None if adapter is None else {"lofit_adapter": adapter})
        request = EngineCoreRequest(request_id=req_id, prompt_token_ids=prompt, mm_features=None,
                                    sampling_params=params, pooling_params=None, arrival_time=time.time(),
                                    lora_request=None, cache_salt=f"lofit-self-test-{req_id}",
                                    data_parallel_rank=None)
        core.add_request(*core.preprocess_add_request(request))
    found: dict[str, dict] = {}
    for _ in range(32):
        if not core.scheduler.has_requests():
            break
        outputs, _ = core.step_fn()
        for batch in (outputs or {}).values():
            for out in batch.outputs:
                if out.request_id in requests and out.new_logprobs is not None:
                    found[out.request_id] = _top_logprobs(out)
    missing = set(requests) - set(found)
    if missing:
        raise SelfTestError(f"LoFiT self-test requests {sorted(missing)} produced no log-probs")
    return found


def self_test(core: Any, tolerance: float | None = None) -> dict[str, float]:
    """Steered must move the logits; unsteered next to it must not. Raises :class:`SelfTestError`."""
    loaded = getattr(core, _ATTR, None)
    if loaded is None:
        return {}
    config = core.vllm_config.model_config
    if tolerance is None:
        tolerance = 1e-3 if str(config.dtype) == "torch.float32" else 0.1
    vocab = config.get_vocab_size()
    prompt = [(7 + 31 * i) % vocab for i in range(12)]
    tag = uuid.uuid4().hex[:8]
    # fresh content each time, so a bank row is written (not reused) and the whole path is exercised
    info = core.model_executor.collective_rpc("lofit_load_self_test", args=(uuid.uuid4().int % 2**31,))[0]
    loaded[SELF_TEST_ADAPTER] = info["content_sha256"]
    try:
        base = _run(core, {f"base-{tag}": None}, prompt, 8)[f"base-{tag}"]
        mixed = _run(core, {f"steered-{tag}": SELF_TEST_ADAPTER, f"plain-{tag}": None}, prompt, 8)
    finally:
        core.model_executor.collective_rpc("lofit_unload", args=(SELF_TEST_ADAPTER,))
        loaded.pop(SELF_TEST_ADAPTER, None)

    def distance(a: dict[int, float], b: dict[int, float]) -> float:
        shared = set(a) & set(b)
        if max(a, key=a.get) != max(b, key=b.get) or len(shared) < 2:
            return float("inf")
        return max(abs(a[t] - b[t]) for t in shared)

    plain, steered = distance(mixed[f"plain-{tag}"], base), distance(mixed[f"steered-{tag}"], base)
    if plain > tolerance:
        raise SelfTestError(f"LoFiT self-test: an unsteered request next to a steered one changed its log-probs "
                            f"by {plain:.3g} (> {tolerance}); steering leaks across requests")
    if steered <= max(10 * tolerance, 0.5):
        raise SelfTestError(f"LoFiT self-test: a strongly steered request changed the log-probs by only "
                            f"{steered:.3g}; steering is not applied")
    logger.info("LoFiT self-test passed: steered log-probs moved by %.3g, unsteered by %.3g (tolerance %g)",
                steered, plain, tolerance)
    return {"unsteered_change": plain, "steered_change": steered}


# -- installation into vLLM's engine core ---------------------------------------------------------------


def install() -> None:
    """Wrap the engine core's request admission, ``collective_rpc`` and start-up, once per process."""
    from vllm.v1.engine import core as core_module
    from vllm.v1.engine.core_client import InprocClient

    engine_core = core_module.EngineCore
    if getattr(engine_core.preprocess_add_request, _MARK, False):
        return

    original_preprocess = engine_core.preprocess_add_request
    original_rpc = engine_core.collective_rpc
    original_kv = engine_core._initialize_kv_caches

    def preprocess_add_request(self, request):
        params = request.sampling_params
        if params is not None:
            extra_args, request.cache_salt = admit(getattr(self, _ATTR, None), params.extra_args, request.cache_salt)
            params.extra_args = extra_args
        return original_preprocess(self, request)

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        results = original_rpc(self, method, timeout, args, kwargs)
        record_rpc(getattr(self, _ATTR, None), method, args, kwargs, results)
        return results

    def _initialize_kv_caches(self, vllm_config):
        result = original_kv(self, vllm_config)
        setattr(self, _ATTR, check_workers(self))
        return result

    for name, fn in (("preprocess_add_request", preprocess_add_request), ("collective_rpc", collective_rpc),
                     ("_initialize_kv_caches", _initialize_kv_caches)):
        setattr(fn, _MARK, True)
        setattr(engine_core, name, fn)

    # The self-test needs the scheduler, which exists only once the engine core is fully built: run it
    # when the engine-core process starts its loop, or right after an in-process engine core is built.
    for cls in (core_module.EngineCoreProc, *core_module.EngineCoreProc.__subclasses__()):
        if "run_busy_loop" in vars(cls):
            _wrap_busy_loop(cls)
    original_inproc = InprocClient.__init__

    def inproc_init(self, *args, **kwargs):
        original_inproc(self, *args, **kwargs)
        self_test(self.engine_core)

    InprocClient.__init__ = inproc_init
    _wrap_inproc_add_request()


def _wrap_inproc_add_request() -> None:
    """With the engine core in-process, an admission error reaches ``LLMEngine.add_request`` after the front
    end has registered the request; forget it there too, or ``LLM.generate`` would wait for it forever."""
    from vllm.v1.engine.llm_engine import LLMEngine

    original = LLMEngine.add_request

    def add_request(self, *args, **kwargs):
        before = set(self.output_processor.request_states)
        try:
            return original(self, *args, **kwargs)
        except Exception:
            self.output_processor.abort_requests(set(self.output_processor.request_states) - before, internal=True)
            raise

    LLMEngine.add_request = add_request


def _wrap_busy_loop(cls: type) -> None:
    original = cls.run_busy_loop

    def run_busy_loop(self, *args, **kwargs):
        self_test(self)
        return original(self, *args, **kwargs)

    cls.run_busy_loop = run_busy_loop
