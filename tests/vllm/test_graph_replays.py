"""The FULL CUDA-graph replay counter the self-test reads, and when the self-test demands a replay.

Fast, on CPU: no graph can be captured here, so the counting wrappers are driven with the runnable they wrap
replaced (the graph launch), under vLLM's real forward context and configs.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest


def test_install_wraps_both_replay_points_once():
    from vllm.compilation.cuda_graph import CUDAGraphWrapper
    from vllm.v1.worker.gpu.cudagraph_utils import CudaGraphManager

    from lofit.vllm import graph_replays

    graph_replays.install()
    first = (CudaGraphManager.run_fullgraph, CUDAGraphWrapper.__call__)
    graph_replays.install()
    assert (CudaGraphManager.run_fullgraph, CUDAGraphWrapper.__call__) == first
    assert all(getattr(fn, graph_replays._MARK, False) for fn in first)


def test_v2_replays_are_counted_and_pass_through():
    from lofit.vllm import graph_replays

    launched = []
    counted = graph_replays._count(lambda manager, desc: launched.append(desc) or "hidden")
    before = graph_replays.full_graph_replays()
    assert counted("manager", "desc-4") == "hidden" and launched == ["desc-4"]
    assert graph_replays.full_graph_replays() == before + 1


@pytest.mark.parametrize(("wrapper_mode", "context_mode", "counts"),
                         [("FULL", "FULL", 1), ("FULL", "PIECEWISE", 0), ("PIECEWISE", "PIECEWISE", 0),
                          ("FULL", "NONE", 0)])
def test_v1_counts_a_full_wrapper_called_in_a_full_step(wrapper_mode, context_mode, counts):
    from vllm.config import CUDAGraphMode, VllmConfig
    from vllm.forward_context import set_forward_context

    from lofit.vllm import graph_replays

    call = graph_replays._v1_wrapper_call(lambda self, x: x * 2)
    wrapper = SimpleNamespace(runtime_mode=CUDAGraphMode[wrapper_mode])
    before = graph_replays.full_graph_replays()
    with set_forward_context(None, VllmConfig(), cudagraph_runtime_mode=CUDAGraphMode[context_mode]):
        assert call(wrapper, 21) == 42
    assert graph_replays.full_graph_replays() - before == counts
    assert call(wrapper, 1) == 2  # outside a forward (capture set-up, dummy runs): passes through, not counted
    assert graph_replays.full_graph_replays() - before == counts


def _config(mode="FULL_AND_PIECEWISE", eager=False, spec=None, max_size=512):
    from vllm.config import CUDAGraphMode

    return SimpleNamespace(
        compilation_config=SimpleNamespace(cudagraph_mode=CUDAGraphMode[mode], max_cudagraph_capture_size=max_size),
        model_config=SimpleNamespace(enforce_eager=eager), speculative_config=spec)


@pytest.mark.parametrize(("config", "expected"), [
    (_config(), True), (_config("FULL_DECODE_ONLY"), True), (_config("FULL"), True),
    (_config("PIECEWISE"), False), (_config("NONE"), False), (_config(eager=True), False),
    (_config(spec=object()), False), (_config(max_size=2), False), (_config(max_size=None), False)])
def test_the_self_test_demands_a_full_replay_only_where_decode_takes_one(config, expected, monkeypatch):
    from vllm.platforms import current_platform

    from lofit.vllm.selftest import expects_full_graph

    assert expects_full_graph(_config(), 3) is False, "this CPU platform has no CUDA graphs"
    monkeypatch.setattr(type(current_platform), "is_cuda_alike", lambda self: True)
    assert expects_full_graph(config, 3) is expected


def test_a_steered_trace_that_changed_its_tokens_counts_as_moved():
    """The self-test's "steering is applied" measure: a near-tie flipped by steering is a move, however small its
    log-prob change; the same tokens are measured by their log-probs (a start failed on 0.43 nats once)."""
    from lofit.vllm.selftest import moved_by

    plain = [(5, {5: -0.70, 6: -0.72}), (9, {9: -0.1, 3: -3.0})]
    flipped = [(6, {5: -0.73, 6: -0.70}), (2, {2: -0.2, 9: -2.0})]
    same_tokens = [(5, {5: -0.60, 6: -0.90}), (9, {9: -0.3, 3: -2.9})]
    assert moved_by(flipped, plain) == float("inf")
    assert moved_by(same_tokens, plain) == pytest.approx(0.2)
    assert moved_by(plain, plain) == 0.0
