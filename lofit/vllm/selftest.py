"""The engine core's start-up checks: every worker runs a hooked runner, then steering is seen to work.

At start-up the engine refuses to run a LoFiT model unless every worker reports its runner's hook
installed (:func:`check_workers`), and then runs a self-test through the real scheduler and runner
(:func:`self_test`): requests steered two ways and a plain one, batched together for several decode steps,
must each match their own run next to plain requests, and the steered ones must differ from the plain one.
:mod:`lofit.vllm.engine_core` calls both.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Any

import numpy as np

from lofit.vllm.admission import loaded_adapters
from lofit.vllm.architectures import is_lofit_model
from lofit.vllm.contract import (
    RPC_FULL_GRAPH_REPLAYS,
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


STEPS = 4  # decode steps per request: the test sees decodes, not only the prefill
TOP = 8  # log-probs compared per step


def _top_logprobs(output: Any) -> dict[int, float]:
    lists = output.new_logprobs
    ids, values = np.asarray(lists.logprob_token_ids[0]).tolist(), np.asarray(lists.logprobs[0]).tolist()
    return dict(zip(ids, values, strict=True))


Trace = list[tuple[int, dict[int, float]]]  # per generated token: (token id, top log-probs)


def _run(core: Any, requests: dict[str, Any], prompt: list[int]) -> dict[str, Trace]:
    """Run greedy requests ``{id: adapter choice}`` together for :data:`STEPS` tokens each; their traces."""
    from vllm import SamplingParams
    from vllm.v1.engine import EngineCoreRequest

    for req_id, choice in requests.items():
        params = SamplingParams(max_tokens=STEPS, temperature=0.0, logprobs=TOP, ignore_eos=True,
                                extra_args=extra_args_for(choice))
        request = EngineCoreRequest(request_id=req_id, prompt_token_ids=prompt, mm_features=None,
                                    sampling_params=params, pooling_params=None, arrival_time=time.time(),
                                    lora_request=None, cache_salt=f"lofit-self-test-{req_id}",
                                    data_parallel_rank=None)
        core.add_request(*core.preprocess_add_request(request))
    traces: dict[str, Trace] = {req_id: [] for req_id in requests}
    for _ in range(32 * STEPS):
        if not core.scheduler.has_requests():
            break
        outputs, _ = core.step_fn()
        for batch in (outputs or {}).values():
            for out in batch.outputs:
                if out.request_id in traces and out.new_logprobs is not None and out.new_token_ids:
                    traces[out.request_id].append((out.new_token_ids[0], _top_logprobs(out)))
    short = sorted(req_id for req_id, trace in traces.items() if len(trace) < STEPS)
    if short:
        raise SelfTestError(f"LoFiT self-test requests {short} produced fewer than {STEPS} tokens with log-probs")
    return traces


def moved_by(steered: Trace, plain: Trace) -> float:
    """How far a steered trace is from the plain one: :func:`distance`, or ``inf`` when they chose different tokens
    (no unsteered request changes its tokens: the leak check bounds that by the tolerance), so a steered request
    whose first differing step was a near-tie still counts as moved."""
    if [token for token, _ in steered] != [token for token, _ in plain]:
        return float("inf")
    return distance(steered, plain)


def distance(a: Trace, b: Trace) -> float:
    """How far two greedy traces of one request are apart: the largest difference (nats) of a top token's
    log-prob over the steps up to and including the first step where they chose different tokens (after it,
    the inputs differ). ``inf`` when a step shares fewer than two top tokens. Robust to reduced precision: a
    near-tie that flips the chosen token does not by itself fail the comparison."""
    worst = 0.0
    for (token_a, top_a), (token_b, top_b) in zip(a, b, strict=False):
        shared = set(top_a) & set(top_b)
        if len(shared) < 2:
            return float("inf")
        worst = max(worst, max(abs(top_a[t] - top_b[t]) for t in shared))
        if token_a != token_b:
            break
    return worst


def expects_full_graph(vllm_config: Any, batch_size: int) -> bool:
    """Whether a decode step of ``batch_size`` requests should replay a FULL CUDA graph in this engine: a CUDA
    (or ROCm) platform, graphs not disabled (``enforce_eager``), a FULL mode for decode batches (vLLM's default
    ``FULL_AND_PIECEWISE``), no speculative decoding (its decode batches take several tokens per request) and
    ``batch_size`` within the captured sizes (``vllm/config/compilation.py``; gpu-readiness §2)."""
    from vllm.config import CUDAGraphMode
    from vllm.platforms import current_platform

    compilation = vllm_config.compilation_config
    mode = compilation.cudagraph_mode
    return bool(current_platform.is_cuda_alike() and not vllm_config.model_config.enforce_eager
                and mode is not None and mode.decode_mode() == CUDAGraphMode.FULL
                and vllm_config.speculative_config is None
                and batch_size <= (compilation.max_cudagraph_capture_size or 0))


def self_test(core: Any, tolerance: float | None = None) -> dict[str, float]:
    """Steering must be applied, per request, in a mixed batch. Raises :class:`SelfTestError`.

    Three requests run together for :data:`STEPS` greedy tokens: steered by a strong random adapter A, plain,
    and steered by A at strength -1 (a second bank row); a batch of 3 is no CUDA-graph capture size, so a
    GPU pads it. Each is compared with itself run next to two plain requests (a batch of the same shape):
    each must match within ``tolerance`` (nats; default 1e-3 in float32, 0.1 otherwise, or
    ``LOFIT_SELF_TEST_TOLERANCE``), or steering leaks across requests; and each steered request run that way
    must differ from the plain one by more than ``max(10 * tolerance, 0.5)``, or steering is not applied.
    Where a decode batch of 3 should replay a FULL CUDA graph (:func:`expects_full_graph`), at least one such
    replay must have happened during the test, or the test did not see the path most tokens take.
    """
    loaded = loaded_adapters(core)
    if loaded is None:
        return {}
    config = core.vllm_config.model_config
    if tolerance is None:
        tolerance = float(os.environ.get("LOFIT_SELF_TEST_TOLERANCE") or
                          (1e-3 if str(config.dtype) == "torch.float32" else 0.1))
    vocab = config.get_vocab_size()
    prompt = [(7 + 31 * i) % vocab for i in range(12)]
    tag = uuid.uuid4().hex[:8]
    choices = {"steered": SELF_TEST_ADAPTER, "plain": None, "negated": {SELF_TEST_ADAPTER: -1.0}}
    replays_before = sum(core.model_executor.collective_rpc(RPC_FULL_GRAPH_REPLAYS))
    # fresh content each time, so a bank row is written (not reused) and the whole path is exercised
    info = core.model_executor.collective_rpc(RPC_LOAD_SELF_TEST, args=(uuid.uuid4().int % 2**31,))[0]
    loaded[SELF_TEST_ADAPTER] = info["content_sha256"]
    try:
        mixed = _run(core, {f"{key}-{tag}": choice for key, choice in choices.items()}, prompt)
        alone = {}
        for key, choice in choices.items():
            fillers = {f"filler-{key}-{i}-{tag}": None for i in range(len(choices) - 1)}
            alone[key] = _run(core, {f"{key}-alone-{tag}": choice, **fillers}, prompt)[f"{key}-alone-{tag}"]
    finally:
        core.model_executor.collective_rpc(RPC_UNLOAD, args=(SELF_TEST_ADAPTER,))
        loaded.pop(SELF_TEST_ADAPTER, None)

    replays = sum(core.model_executor.collective_rpc(RPC_FULL_GRAPH_REPLAYS)) - replays_before
    if replays == 0 and expects_full_graph(core.vllm_config, len(choices)):
        raise SelfTestError("LoFiT self-test: this engine replays FULL CUDA graphs for decode batches, but none was "
                            "replayed while the test ran, so it could not check the path most tokens take")
    leaks = {key: distance(mixed[f"{key}-{tag}"], alone[key]) for key in choices}
    worst = max(leaks, key=leaks.get)
    if leaks[worst] > tolerance:
        raise SelfTestError(f"LoFiT self-test: the {worst} request's log-probs in a mixed batch differ by "
                            f"{leaks[worst]:.3g} (> {tolerance}) from the same request next to plain ones; "
                            "steering leaks across requests" + (
                                ", or this model's kernels are not batch-invariant on this platform (the plain "
                                "request moved)" if worst == "plain" else ""))
    moved = {key: moved_by(alone[key], alone["plain"]) for key in ("steered", "negated")}
    weakest = min(moved, key=moved.get)
    if moved[weakest] <= max(10 * tolerance, 0.5):
        raise SelfTestError(f"LoFiT self-test: a strongly steered ({weakest}) request changed the log-probs by "
                            f"only {moved[weakest]:.3g}; steering is not applied")
    moved_text = ("its tokens changed" if moved[weakest] == float("inf")
                  else f"log-probs moved by {moved[weakest]:.3g}")
    logger.info("LoFiT self-test passed (%d requests x %d tokens, %d FULL CUDA-graph replays): a strongly steered "
                "request's %s; a mixed batch differs from one request's own run by %.3g (tolerance %g)",
                len(choices), STEPS, replays, moved_text, leaks[worst], tolerance)
    return {"unsteered_change": leaks[worst], "steered_change": moved[weakest], "full_graph_replays": replays}
