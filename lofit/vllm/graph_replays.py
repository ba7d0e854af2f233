"""Thin adapter (worker process): count FULL CUDA-graph replays, so the self-test can tell whether it ran the
path most decode tokens take on a GPU.

vLLM 0.32 replays a FULL graph in two places (``../shared/docs/gpu-readiness.md`` §1-2): the V2 runner calls
``CudaGraphManager.run_fullgraph(desc)`` (``vllm/v1/worker/gpu/cudagraph_utils.py``), the V1 runner calls a
``CUDAGraphWrapper`` whose runtime mode is FULL while the forward context asks for FULL
(``vllm/compilation/cuda_graph.py``). Both are wrapped once per process to add one to a counter; captures
(before the engine serves) count too, so callers compare the counter before and after what they run.
"""

from __future__ import annotations

import functools
from typing import Any

_MARK = "_lofit_counts_replays"
_replays = 0


def full_graph_replays() -> int:
    """FULL CUDA-graph launches (replays, and the captures before them) in this process since start-up."""
    return _replays


def _count(original):
    @functools.wraps(original)
    def counted(*args, **kwargs):
        global _replays
        _replays += 1
        return original(*args, **kwargs)

    setattr(counted, _MARK, True)
    return counted


def _v1_wrapper_call(original):
    from vllm.config import CUDAGraphMode
    from vllm.forward_context import get_forward_context, is_forward_context_available

    @functools.wraps(original)
    def __call__(self, *args: Any, **kwargs: Any):
        global _replays
        if (self.runtime_mode == CUDAGraphMode.FULL and is_forward_context_available()
                and get_forward_context().cudagraph_runtime_mode == CUDAGraphMode.FULL):
            _replays += 1
        return original(self, *args, **kwargs)

    setattr(__call__, _MARK, True)
    return __call__


def install() -> None:
    """Wrap V2's ``CudaGraphManager.run_fullgraph`` and V1's ``CUDAGraphWrapper.__call__`` (idempotent). A
    runner whose module cannot be imported (the CPU build has no V2 runner) is skipped."""
    try:
        from vllm.v1.worker.gpu.cudagraph_utils import CudaGraphManager
    except ImportError:
        CudaGraphManager = None
    if CudaGraphManager is not None and not getattr(CudaGraphManager.run_fullgraph, _MARK, False):
        CudaGraphManager.run_fullgraph = _count(CudaGraphManager.run_fullgraph)
    from vllm.compilation.cuda_graph import CUDAGraphWrapper

    if not getattr(CUDAGraphWrapper.__call__, _MARK, False):
        CUDAGraphWrapper.__call__ = _v1_wrapper_call(CUDAGraphWrapper.__call__)
