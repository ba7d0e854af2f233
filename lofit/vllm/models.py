"""LoFiT model wrappers for vLLM: the stock model, with an attention that adds the bank's offsets to the
input of ``o_proj`` for every token.

Module and parameter names are vLLM's own, so checkpoints load unchanged. The offset is a branch-free
gather-add from the worker's :class:`~lofit.vllm.bank.AdapterBank` (row 0 = zeros), which torch.compile
traces once and which reads the bank's tensors at call time.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import torch
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM

from lofit.heads import identity_from_checkpoint
from lofit.vllm.bank import AdapterBank, active_bank, install_bank

_LAYER = re.compile(r"layers\.(\d+)\.")


def layer_index(prefix: str) -> int:
    """``"model.layers.12.self_attn"`` -> 12."""
    match = _LAYER.search(prefix + ".")
    if match is None:
        raise ValueError(f"cannot find the layer index in module prefix {prefix!r}")
    return int(match.group(1))


def build_bank(vllm_config: VllmConfig, capacity: int | None = None) -> AdapterBank:
    """The bank for this worker: one row per running sequence plus row 0, one token row per batched token."""
    model_dir = Path(vllm_config.model_config.model)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"LoFiT needs a local checkpoint directory to fingerprint the model, got {model_dir}")
    scheduler = vllm_config.scheduler_config
    return AdapterBank(
        identity_from_checkpoint(model_dir, name=model_dir.name),
        capacity=max(capacity or 0, scheduler.max_num_seqs + 1),
        max_num_tokens=scheduler.max_num_batched_tokens,
        dtype=vllm_config.model_config.dtype,
        device=vllm_config.device_config.device,
        tp_rank=get_tensor_model_parallel_rank(),
        tp_size=get_tensor_model_parallel_world_size(),
    )


class LofitLlamaAttention(LlamaAttention):
    """Llama attention whose output gets each token's adapter offsets before ``o_proj``."""

    def __init__(self, *args, prefix: str = "", **kwargs) -> None:
        super().__init__(*args, prefix=prefix, **kwargs)
        self.lofit_layer = layer_index(prefix)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        attn_output = active_bank().apply(self.lofit_layer, self.attn(q, k, v))
        output, _ = self.o_proj(attn_output)
        return output


class LofitLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` (Llama, SmolLM2, ...) with LoFiT attention; creates this worker's bank."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        install_bank(build_bank(vllm_config))
        super().__init__(vllm_config=vllm_config, prefix=prefix,
                         layer_type=partial(LlamaDecoderLayer, attn_layer_type=LofitLlamaAttention))
