"""Thin adapter for vLLM's V2 model runner (MRV2, the GPU default): fill the bank's token rows on device.

MRV2 asks the model for its ``ModelState`` class (``get_model_state_cls``). LoFiT answers with the state vLLM
would have chosen for the stock model (the model's own, else vLLM's resolver: default, encoder-decoder, ...;
:func:`model_state_cls`) composed with :class:`LofitModelStateMixin`, which adds one bank row per persistent
request slot: ``add_request`` resolves a request's
``extra_args`` to a bank row once and writes it into ``slot_rows[req_index]``; ``prepare_inputs``, which
MRV2 calls before every forward, expands it to one row per token with a gather and a ``searchsorted``, with
no host sync. MRV2 re-sorts the batch every step, so the batch order is read from ``idx_mapping`` each time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.v1.core.sched.output import NewRequestData
from vllm.v1.worker.gpu.input_batch import InputBatch
from vllm.v1.worker.gpu.mm.encoder_cache import EncoderCache
from vllm.v1.worker.gpu.model_states import resolve_model_state_cls
from vllm.v1.worker.gpu.model_states.default import DefaultModelState
from vllm.v1.worker.gpu.model_states.interface import ModelState
from vllm.v1.worker.gpu.states import RequestState

from lofit.vllm.bank import AdapterBank, RequestRows, active_bank, fill_token_rows_v2


class LofitModelStateMixin:
    """Composed before a vLLM ``ModelState`` class: that state, plus each request slot's bank row."""

    def __init__(self, vllm_config: VllmConfig, model: nn.Module, encoder_cache: EncoderCache | None,
                 device: torch.device) -> None:
        super().__init__(vllm_config, model, encoder_cache, device)
        self.bank: AdapterBank = active_bank()
        self.rows = RequestRows(self.bank)
        self.slot_rows = torch.zeros(self.max_num_reqs, dtype=self.bank.token_rows.dtype, device=device)
        self.req_slots: dict[str, int] = {}  # req_id -> persistent slot (req_index)

    def add_request(self, req_index: int, new_req_data: NewRequestData) -> None:
        """A new or re-admitted (preempted, streamed) request: hold its bank row and record it for its slot."""
        super().add_request(req_index, new_req_data)
        params = new_req_data.sampling_params
        row = self.rows.row_for(new_req_data.req_id, params.extra_args if params is not None else None)
        self.slot_rows[req_index:req_index + 1].fill_(row)
        self.req_slots[new_req_data.req_id] = req_index

    def remove_request(self, req_id: str) -> None:
        """A finished or preempted request: release its row and clear its slot (no-op for unknown ids)."""
        self.rows.release(req_id)
        slot = self.req_slots.pop(req_id, None)
        if slot is not None:
            self.slot_rows[slot:slot + 1].zero_()
        super().remove_request(req_id)

    def prepare_inputs(self, input_batch: InputBatch, req_states: RequestState) -> dict[str, Any]:
        """vLLM's model inputs, after filling the bank's per-token rows on the device from the slots' rows."""
        model_inputs = super().prepare_inputs(input_batch, req_states)
        fill_token_rows_v2(self.bank.token_rows, self.slot_rows, input_batch.idx_mapping,
                           input_batch.query_start_loc, input_batch.num_reqs, input_batch.num_tokens,
                           input_batch.num_tokens_after_padding)
        return model_inputs

    def prepare_dummy_inputs(self, num_reqs: int, num_tokens: int) -> dict[str, Any]:
        """CUDA-graph capture: no adapter on any token (called before capture, so not recorded in the graph)."""
        model_inputs = super().prepare_dummy_inputs(num_reqs, num_tokens)
        self.bank.token_rows.zero_()
        return model_inputs


_STATE_CLASSES: dict[type, type] = {}


def lofit_state_class(base: type[ModelState]) -> type[ModelState]:
    """``Lofit<base>``: the vLLM model state ``base`` with LoFiT's per-slot bank rows (made once per class)."""
    if base not in _STATE_CLASSES:
        _STATE_CLASSES[base] = type(f"Lofit{base.__name__}", (LofitModelStateMixin, base), {"__module__": __name__})
    return _STATE_CLASSES[base]


LofitModelState = lofit_state_class(DefaultModelState)  # what a plain decoder gets


class _ModulesOnly:
    """The model as vLLM's resolver would see it without LoFiT: its modules, no ``get_model_state_cls``."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = model.modules


def model_state_cls(vllm_config: VllmConfig, model: nn.Module, own: Callable[[], type] | None) -> type[ModelState]:
    """The MRV2 state class for a LoFiT model: the stock model's own state (``own``, its
    ``get_model_state_cls``) or else the one vLLM's ``resolve_model_state_cls``
    (``vllm/v1/worker/gpu/model_states/__init__.py``) picks for its modules and config, with the bank rows."""
    base = own() if own is not None else resolve_model_state_cls(vllm_config, _ModulesOnly(model))
    return lofit_state_class(base)


def hook_installed(model_runner: Any) -> bool:
    """Whether a V2 model runner (``vllm.v1.worker.gpu.model_runner.GPUModelRunner``) uses a LoFiT state."""
    return isinstance(getattr(model_runner, "model_state", None), LofitModelStateMixin)
