"""The engine core's start-up checks: every worker runs a hooked runner, then steering is seen to work.

At start-up the engine refuses to run a LoFiT model unless every worker reports its runner's hook
installed (:func:`check_workers`), and then runs a self-test through the real scheduler and runner
(:func:`self_test`): a strongly steered request must change the logits, and an unsteered request next to
it must not. :mod:`lofit.vllm.engine_core` calls both.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import numpy as np

from lofit.vllm.admission import loaded_adapters
from lofit.vllm.architectures import is_lofit_model
from lofit.vllm.contract import (
    RPC_LIST,
    RPC_LOAD_SELF_TEST,
    RPC_STATUS,
    RPC_UNLOAD,
    SELF_TEST_ADAPTER,
    extra_args_for,
)

logger = logging.getLogger("vllm.lofit")  # under vLLM's logger, so it shows in vLLM's logs


class SelfTestError(RuntimeError):
    """The engine's steering self-test failed: the engine must not serve."""


def check_workers(core: Any) -> dict[str, str] | None:
    """For a LoFiT model: every worker has a bank and a hooked runner; returns the loaded adapters."""
    if not is_lofit_model(core.vllm_config.model_config.architectures):
        return None
    statuses = core.model_executor.collective_rpc(RPC_STATUS)
    broken = [s for s in statuses if not (s["bank"] and s["hook"])]
    if broken:
        raise SelfTestError(
            "LoFiT cannot tell that its steering hook is installed on the active model runner "
            f"({broken[0]['runner']} runner, {broken[0]['class']}); refusing to start rather than serve "
            "without steering. Supported: vLLM 0.32 V1 and V2 model runners.")
    loaded = dict(core.model_executor.collective_rpc(RPC_LIST)[0])
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
                                extra_args=extra_args_for(adapter))
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
    loaded = loaded_adapters(core)
    if loaded is None:
        return {}
    config = core.vllm_config.model_config
    if tolerance is None:
        tolerance = 1e-3 if str(config.dtype) == "torch.float32" else 0.1
    vocab = config.get_vocab_size()
    prompt = [(7 + 31 * i) % vocab for i in range(12)]
    tag = uuid.uuid4().hex[:8]
    # fresh content each time, so a bank row is written (not reused) and the whole path is exercised
    info = core.model_executor.collective_rpc(RPC_LOAD_SELF_TEST, args=(uuid.uuid4().int % 2**31,))[0]
    loaded[SELF_TEST_ADAPTER] = info["content_sha256"]
    try:
        base = _run(core, {f"base-{tag}": None}, prompt, 8)[f"base-{tag}"]
        mixed = _run(core, {f"steered-{tag}": SELF_TEST_ADAPTER, f"plain-{tag}": None}, prompt, 8)
    finally:
        core.model_executor.collective_rpc(RPC_UNLOAD, args=(SELF_TEST_ADAPTER,))
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
