"""LoFiT model wrappers for vLLM: the stock model, whose attention output projections add each token's
adapter offsets to their input.

Every ``self_attn.o_proj`` of the stock model gets a subclass of its own class whose ``forward`` first adds
the bank's offsets for that layer (a branch-free gather-add, row 0 = zeros). The module objects, names and
parameters are vLLM's own, so checkpoints load unchanged, and the rest of the attention (rotary scaling,
QK-norm, ...) is untouched. On a tensor-parallel rank ``o_proj`` is row-parallel, so its input holds this
rank's heads, and so does the bank.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from lofit.adapter import load_adapter
from lofit.heads import identity_from_checkpoint
from lofit.vllm.bank import AdapterBank, active_bank, install_bank

_LAYER = re.compile(r"layers\.(\d+)\.")


def layer_index(prefix: str) -> int:
    """``"model.layers.12.self_attn.o_proj"`` -> 12."""
    match = _LAYER.search(prefix + ".")
    if match is None:
        raise ValueError(f"cannot find the layer index in module name {prefix!r}")
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


def preload_adapters(bank: AdapterBank, spec: str | None) -> list[str]:
    """Load the adapters named by ``LOFIT_ADAPTERS``: directories separated by ``os.pathsep``, each an adapter
    or a folder of adapters. A broken adapter stops the start with its error (it was asked for by name)."""
    names = []
    for entry in filter(None, (spec or "").split(os.pathsep)):
        root = Path(entry)
        if not root.is_dir():
            raise FileNotFoundError(f"LOFIT_ADAPTERS: {root} is not a directory")
        paths = [root] if (root / "adapter_config.json").is_file() else sorted(
            p for p in root.iterdir() if (p / "adapter_config.json").is_file())
        for path in paths:
            adapter = load_adapter(path, expect_base=bank.base)
            bank.load(adapter)
            names.append(adapter.name)
    return names


_STEERED_CLASSES: dict[type, type] = {}


def _steered_class(cls: type) -> type:
    """``cls`` (a linear layer) whose forward adds the bank's offsets for ``self.lofit_layer`` to its input."""
    if cls not in _STEERED_CLASSES:
        def forward(self, input_: torch.Tensor, *args, **kwargs):
            return cls.forward(self, active_bank().apply(self.lofit_layer, input_), *args, **kwargs)

        _STEERED_CLASSES[cls] = type(f"Lofit{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
    return _STEERED_CLASSES[cls]


def steer_o_proj(model: nn.Module) -> int:
    """Make every attention ``o_proj`` of ``model`` add its layer's offsets; returns how many were found."""
    found = 0
    for name, module in model.named_modules():
        if name.endswith("self_attn.o_proj"):
            module.lofit_layer = layer_index(name)
            module.__class__ = _steered_class(type(module))
            found += 1
    if not found:
        raise ValueError(f"no self_attn.o_proj modules found in {type(model).__name__}")
    return found


class LofitModelMixin:
    """Builds this worker's bank before the stock model, then steers its ``o_proj`` layers."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        bank = build_bank(vllm_config)
        preload_adapters(bank, os.environ.get("LOFIT_ADAPTERS"))
        install_bank(bank)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        steer_o_proj(self)

    @staticmethod
    def get_model_state_cls() -> type:
        """The V2 model runner's state for this model: it fills the bank's token rows before every forward."""
        from lofit.vllm.runner_v2 import LofitModelState

        return LofitModelState


class LofitLlamaForCausalLM(LofitModelMixin, LlamaForCausalLM):
    """``LlamaForCausalLM`` (Llama 2/3, SmolLM2, ...) with LoFiT steering."""


class LofitMistralForCausalLM(LofitModelMixin, MistralForCausalLM):
    """``MistralForCausalLM`` with LoFiT steering."""


class LofitQwen2ForCausalLM(LofitModelMixin, Qwen2ForCausalLM):
    """``Qwen2ForCausalLM`` (Qwen2, Qwen2.5) with LoFiT steering."""
