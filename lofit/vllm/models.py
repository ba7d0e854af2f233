"""LoFiT model wrappers for vLLM: the stock model, whose attention output projections add each token's
adapter offsets to their input.

``Lofit<Arch>`` is made on demand (module ``__getattr__``) for any architecture vLLM resolves natively:
``type("Lofit<Arch>", (LofitModelMixin, <vLLM's class>), {})``. After the stock model is built, every
decoder attention output projection (found from vLLM's KV-cache attention layers, :func:`decoder_projections`)
gets a subclass of its own class whose ``forward`` first adds the bank's offsets for that layer (a
branch-free gather-add, row 0 = zeros). The module objects, names and parameters are vLLM's own, so
checkpoints load unchanged, and the rest of the attention (rotary scaling, QK-norm, soft-capping, sliding
windows, ...) is untouched. On a tensor-parallel rank the projection is row-parallel, so its input holds this
rank's heads, and so does the bank. Models that cannot be steered this way (hybrid, recurrent,
attention-free, or a projection whose width is not heads × value head size) are refused at start-up.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

from lofit.adapter import load_adapter
from lofit.heads import PROJECTION_NAMES, SUPPORTED_ARCHITECTURES, identity_from_checkpoint
from lofit.vllm.architectures import WRAPPER_PREFIX, base_architecture
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


def _value_head_size(attn: nn.Module) -> int:
    """The width of one head of the attention's output: ``head_size_v`` (``Attention``) or ``v_head_dim`` (MLA)."""
    return int(getattr(attn, "head_size_v", None) or attn.v_head_dim)


def decoder_projections(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    """``{layer: (name, output projection)}`` of every decoder self-attention of a vLLM model.

    The projections are found from the KV-cache attention layers (vLLM's ``Attention`` / ``MLAAttention`` of
    type decoder), so a vision or audio tower (which uses other attention classes) is never included and the
    naming of the block (``self_attn``/``attn``) does not matter: the nearest enclosing module with an
    ``o_proj``/``out_proj``/``dense``/``wo`` linear layer holds it. Each projection's input width (this rank's
    part) must equal the attention's local heads × value head size. Raises ``ValueError`` (start-up refusal)
    when a width differs or a layer has two projections.
    """
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.model_executor.layers.attention.mla_attention import MLAAttention
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.v1.attention.backend import AttentionType

    modules = dict(model.named_modules())
    found: dict[int, tuple[str, nn.Module]] = {}
    for name, attn in modules.items():
        if not isinstance(attn, Attention | MLAAttention):
            continue
        if getattr(attn, "attn_type", AttentionType.DECODER) != AttentionType.DECODER:
            continue
        parts = name.split(".")[:-1]
        proj_name, proj = None, None
        while parts and proj is None:
            owner = ".".join(parts)
            for attr in PROJECTION_NAMES:
                candidate = getattr(modules[owner], attr, None)
                if isinstance(candidate, LinearBase):
                    proj_name, proj = f"{owner}.{attr}", candidate
                    break
            parts.pop()
        if proj is None:
            raise ValueError(f"LoFiT cannot steer {type(model).__name__}: no output projection "
                             f"({'/'.join(PROJECTION_NAMES)}) encloses the attention {name}")
        width = attn.num_heads * _value_head_size(attn)
        if proj.input_size_per_partition != width:
            raise ValueError(f"LoFiT cannot steer {type(model).__name__}: {proj_name} takes "
                             f"{proj.input_size_per_partition} inputs on this rank, but its attention has "
                             f"{attn.num_heads} heads x {_value_head_size(attn)} = {width}; the heads are not laid "
                             "out contiguously at its input")
        layer = layer_index(proj_name)
        if layer in found and found[layer][1] is not proj:
            raise ValueError(f"LoFiT cannot steer {type(model).__name__}: layer {layer} has two attention output "
                             f"projections ({found[layer][0]}, {proj_name})")
        found[layer] = (proj_name, proj)
    return found


def steer_o_proj(model: nn.Module, num_layers: int, heads_per_rank: int) -> int:
    """Make every decoder attention output projection of ``model`` add its layer's offsets; returns how many.

    Raises ``ValueError`` when the projections do not cover layers ``0..num_layers-1`` exactly, or a layer's
    attention does not hold ``heads_per_rank`` query heads (the adapter's layout on this rank)."""
    found = decoder_projections(model)
    if sorted(found) != list(range(num_layers)):
        raise ValueError(f"LoFiT cannot steer {type(model).__name__}: attention output projections found in layers "
                         f"{sorted(found)}, but the model has {num_layers} decoder layers (hybrid or partly "
                         f"attention-free models are not supported; {SUPPORTED})")
    for layer, (name, proj) in found.items():
        width = proj.input_size_per_partition
        if width % heads_per_rank:
            raise ValueError(f"LoFiT cannot steer {name}: {width} inputs do not split into {heads_per_rank} heads")
        proj.lofit_layer = layer
        proj.__class__ = _steered_class(type(proj))
    return len(found)


SUPPORTED = f"served and checked: {', '.join(SUPPORTED_ARCHITECTURES)}"


def model_class_refusal(base: type) -> str | None:
    """Why LoFiT cannot steer vLLM's model class ``base`` (hybrid, recurrent or attention-free: vLLM's own
    ``is_hybrid`` / ``has_inner_state`` / ``is_attention_free`` interfaces), or ``None``."""
    from vllm.model_executor.models.interfaces import has_inner_state, is_attention_free, is_hybrid

    if is_hybrid(base) or is_attention_free(base) or has_inner_state(base):
        return (f"LoFiT steers attention heads at every layer; {base.__name__} is a hybrid, recurrent or "
                f"attention-free model and is not supported ({SUPPORTED})")
    return None


def unsupported_settings(vllm_config: VllmConfig) -> list[str]:
    """The engine settings LoFiT cannot steer correctly under, each with its reason (empty: none).

    - micro-batching (dual-batch overlap, ``ubatch_size`` > 1): each micro-batch would read the per-token rows
      from token 0 (``../shared/docs/gpu-readiness.md`` §5);
    - LoRA: vLLM's LoRA matches ``o_proj`` by exact class, which the steered projection no longer is, so LoRA
      would silently skip it;
    - sleep mode: waking from level 2 restores the weights but not the adapter bank's tables.
    """
    reasons = []
    if getattr(vllm_config.parallel_config, "use_ubatching", False):
        reasons.append("micro-batching (--enable-dbo / --ubatch-size > 1): each micro-batch would read the first "
                       "one's adapter rows")
    if getattr(vllm_config, "lora_config", None) is not None:
        reasons.append("LoRA (--enable-lora): vLLM's LoRA would skip the steered o_proj; serve LoRA adapters from "
                       "a separate engine")
    if getattr(vllm_config.model_config, "enable_sleep_mode", False):
        reasons.append("sleep mode (--enable-sleep-mode): waking from level 2 does not restore the adapter bank")
    return reasons


class LofitModelMixin:
    """Builds this worker's bank before the stock model, then steers its decoder attention output projections."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        base = next(c for c in type(self).__mro__[1:] if c is not LofitModelMixin and issubclass(c, nn.Module))
        refusal = model_class_refusal(base)
        if refusal:
            raise ValueError(refusal)
        reasons = unsupported_settings(vllm_config)
        if reasons:
            raise ValueError("LoFiT cannot steer correctly with " + "; ".join(reasons))
        bank = build_bank(vllm_config)
        preload_adapters(bank, os.environ.get("LOFIT_ADAPTERS"))
        install_bank(bank)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.lofit_vllm_config = vllm_config  # for get_model_state_cls, which vLLM calls without it
        layout = bank.base.layout
        steer_o_proj(self, layout.num_layers, layout.num_heads // get_tensor_model_parallel_world_size())

    def get_model_state_cls(self) -> type:
        """The V2 model runner's state for this model: the state vLLM would choose for the stock model, composed
        with LoFiT's, which fills the bank's token rows before every forward (:func:`~lofit.vllm.runner_v2.
        model_state_cls`)."""
        from lofit.vllm.runner_v2 import model_state_cls

        return model_state_cls(self.lofit_vllm_config, self, getattr(super(), "get_model_state_cls", None))


def wrapper_class(base: type) -> type:
    """``Lofit<Base>``: vLLM's model class ``base`` with LoFiT steering (made once per class)."""
    name = WRAPPER_PREFIX + base.__name__
    cls = globals().get(name)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        cls = type(name, (LofitModelMixin, base),
                   {"__module__": __name__, "__doc__": f"``{base.__name__}`` with LoFiT steering."})
        globals()[name] = cls
    return cls


def native_model_class(architecture: str) -> type | None:
    """vLLM's own model class for ``architecture`` (a wrapper's name is read as its base), or ``None`` when vLLM
    does not implement it natively. Imports that model's vLLM module."""
    from vllm import ModelRegistry

    registered = ModelRegistry.models.get(base_architecture(architecture) or architecture)
    return registered.load_model_cls() if registered is not None else None


def __getattr__(name: str) -> type:
    """``Lofit<Arch>`` on demand, for every architecture vLLM resolves natively (how vLLM imports the wrapper
    it was registered with: ``lofit.vllm.models:Lofit<Arch>``)."""
    base_arch = base_architecture(name)
    if base_arch is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    base = native_model_class(base_arch)
    if base is None:
        raise AttributeError(f"vLLM has no architecture {base_arch!r} to make {name} from")
    return wrapper_class(base)
