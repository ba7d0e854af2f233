"""Thin adapter for vLLM's V1 model runner (what the CPU build runs): fill the bank's token rows before
every real forward.

``GPUModelRunner._model_forward`` is vLLM's documented override point and runs only for real batches; the
wrapper reads the persistent batch order (``input_batch.req_ids``), each request's ``extra_args`` and
per-request token counts (``query_start_loc``), and writes one bank row per token, zero for padding.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lofit.vllm.bank import RequestRows, active_bank, has_bank

_MARK = "_lofit_wrapped"


def fill_token_rows(runner: Any, num_padded: int) -> None:
    """Per-token rows for the batch the V1 runner is about to run."""
    tracker: RequestRows | None = getattr(runner, "_lofit_rows", None)
    if tracker is None:
        tracker = runner._lofit_rows = RequestRows(active_bank())
    tracker.release_finished(runner.requests.keys())  # the V1 runner has no per-request removal hook
    num_reqs = runner.input_batch.num_reqs
    req_ids = runner.input_batch.req_ids[:num_reqs]
    counts = np.diff(runner.query_start_loc.np[: num_reqs + 1]).tolist()
    rows = [tracker.row_for(rid, runner.requests[rid].sampling_params.extra_args) for rid in req_ids]
    tracker.bank.fill_token_rows(rows, counts, num_padded=num_padded)


def hook_installed(runner: Any) -> bool:
    """Whether this V1 runner's ``_model_forward`` is the LoFiT wrapper."""
    return bool(getattr(type(runner)._model_forward, _MARK, False))


def install() -> None:
    """Wrap ``GPUModelRunner._model_forward`` once per process (the CPU runner inherits it)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._model_forward
    if getattr(original, _MARK, False):
        return

    def _model_forward(self, input_ids=None, positions=None, *args, **kwargs):
        if has_bank():
            fill_token_rows(self, num_padded=positions.shape[-1])
        return original(self, input_ids, positions, *args, **kwargs)

    setattr(_model_forward, _MARK, True)
    GPUModelRunner._model_forward = _model_forward
