"""Head layout and identity of a base model.

LoFiT acts on the input of each attention layer's ``o_proj``: the concatenated per-head attention
outputs, where query head ``h`` occupies columns ``[h * head_dim, (h + 1) * head_dim)``. This module
describes that layout for a Hugging Face causal LM and computes a fingerprint of the base weights, so
an adapter can say exactly which model it was trained on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

# Architectures whose attention feeds ``o_proj`` with the heads laid out contiguously.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

O_PROJ_KEY = "model.layers.{layer}.self_attn.o_proj.weight"


class UnsupportedModelError(ValueError):
    """A model whose attention does not feed a Llama-style ``o_proj`` with contiguous heads."""


@dataclass(frozen=True)
class HeadLayout:
    """Shape of the LoFiT intervention site of a model."""

    num_layers: int
    num_heads: int
    head_dim: int

    @property
    def total_heads(self) -> int:
        """Attention heads in the model: layers × query heads per layer."""
        return self.num_layers * self.num_heads

    def columns(self, head: int) -> slice:
        """Columns of ``o_proj``'s input that belong to query head ``head``."""
        return slice(head * self.head_dim, (head + 1) * self.head_dim)


@dataclass(frozen=True)
class BaseModelIdentity:
    """What an adapter records about the model it belongs to."""

    name_or_path: str
    architecture: str
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    fingerprint: str

    @property
    def layout(self) -> HeadLayout:
        """The head layout (layers, query heads, head_dim) recorded in this identity."""
        return HeadLayout(self.num_hidden_layers, self.num_attention_heads, self.head_dim)

    def to_dict(self) -> dict[str, Any]:
        """The ``base_model`` object of ``adapter_config.json``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaseModelIdentity:
        """Read a ``base_model`` object; raises ``TypeError``/``ValueError`` naming a missing or mistyped field."""
        fields = cls.__dataclass_fields__
        if not isinstance(data, dict):
            raise TypeError(f"base_model must be an object, got {type(data).__name__}")
        missing = [name for name in fields if name not in data]
        if missing:
            raise KeyError(f"base_model is missing {missing}")
        for name, spec in fields.items():
            value, want = data[name], int if spec.type == "int" else str
            if type(value) is not want or (want is int and value < 0):
                raise TypeError(f"base_model.{name} must be a{' non-negative integer' if want is int else ' string'}"
                                f", got {value!r}")
        return cls(**{name: data[name] for name in fields})

    def mismatches(self, other: BaseModelIdentity) -> list[str]:
        """Human-readable differences that make an adapter unusable on ``other`` (name excluded)."""
        out = []
        for name in ("architecture", "num_hidden_layers", "num_attention_heads", "head_dim",
                     "hidden_size", "fingerprint"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                out.append(f"{name}: adapter has {mine!r}, model has {theirs!r}")
        return out


def check_head_count(heads: int | None, heads_percent: float | None) -> None:
    """Exactly one of ``--heads K`` / ``--heads-percent P`` is given and in range (checked before a model loads).

    Raises ``ValueError`` with the message the CLIs show."""
    if (heads is None) == (heads_percent is None):
        raise ValueError("give exactly one of --heads K or --heads-percent P")
    if heads is not None and heads < 1:
        raise ValueError("--heads must be at least 1")
    if heads_percent is not None and not 0 < heads_percent <= 100:
        raise ValueError("--heads-percent must be in (0, 100]")


def choose_k(total_heads: int, heads: int | None, heads_percent: float | None) -> int:
    """K, the number of heads an adapter steers: ``heads``, or ``round(total_heads * heads_percent / 100)`` at
    least 1 (the paper selects 3 % or 10 % of all heads: ``docs/lofit-method.md``, Sec. 3.1).

    Raises ``ValueError`` for a bad setting (:func:`check_head_count`) or a K above ``total_heads``."""
    check_head_count(heads, heads_percent)
    k = heads if heads is not None else round(total_heads * heads_percent / 100)
    if k > total_heads:
        raise ValueError(f"--heads {k} exceeds the model's {total_heads} heads")
    return max(1, k)


def _head_dim(config: dict[str, Any]) -> int:
    head_dim = config.get("head_dim")
    return int(head_dim) if head_dim else config["hidden_size"] // config["num_attention_heads"]


def _architecture(config: dict[str, Any]) -> str:
    archs = config.get("architectures") or []
    return archs[0] if archs else str(config.get("model_type", "unknown"))


def layout_from_config(config: dict[str, Any] | Any) -> HeadLayout:
    """Head layout from a config dict or a ``transformers.PretrainedConfig``."""
    cfg = config if isinstance(config, dict) else config.to_dict()
    return HeadLayout(cfg["num_hidden_layers"], cfg["num_attention_heads"], _head_dim(cfg))


def _identity_fields(config: dict[str, Any]) -> dict[str, Any]:
    missing = [k for k in ("num_hidden_layers", "num_attention_heads", "hidden_size", "vocab_size") if k not in config]
    if missing:
        raise UnsupportedModelError(
            f"{_architecture(config)}: config lacks {missing}; LoFiT supports Llama-style models "
            f"({', '.join(SUPPORTED_ARCHITECTURES)})")
    return {
        "architecture": _architecture(config),
        "num_hidden_layers": int(config["num_hidden_layers"]),
        "num_attention_heads": int(config["num_attention_heads"]),
        "num_key_value_heads": int(config.get("num_key_value_heads") or config["num_attention_heads"]),
        "head_dim": _head_dim(config),
        "hidden_size": int(config["hidden_size"]),
        "vocab_size": int(config["vocab_size"]),
    }


def _fingerprint(fields: dict[str, Any], o_proj_weights: list[torch.Tensor]) -> str:
    """sha256 over the identity fields and every ``o_proj`` weight as float32, layer by layer."""
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    for weight in o_proj_weights:
        digest.update(weight.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def _checkpoint_tensor_files(model_dir: Path) -> dict[str, Path]:
    """Map tensor name -> safetensors file, for single-file and sharded checkpoints."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.exists():
        raise UnsupportedModelError(f"{model_dir} has no model.safetensors (or its index); a safetensors "
                                    "Hugging Face checkpoint is needed")
    with safe_open(single, framework="pt") as handle:
        return {name: single for name in handle.keys()}  # noqa: SIM118 - safe_open has no __iter__


def identity_from_checkpoint(model_dir: str | Path, name: str | None = None) -> BaseModelIdentity:
    """Identity of a Hugging Face checkpoint directory, read from its files (no model is built)."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    fields = _identity_fields(config)
    files = _checkpoint_tensor_files(model_dir)
    weights = []
    for layer in range(fields["num_hidden_layers"]):
        key = O_PROJ_KEY.format(layer=layer)
        if key not in files:
            raise UnsupportedModelError(
                f"{model_dir}: tensor {key} not found; LoFiT needs a Llama-style self_attn.o_proj "
                f"({', '.join(SUPPORTED_ARCHITECTURES)})")
        with safe_open(files[key], framework="pt") as handle:
            weights.append(handle.get_tensor(key))
    return BaseModelIdentity(name_or_path=name or str(model_dir), fingerprint=_fingerprint(fields, weights),
                             **fields)


def o_proj_modules(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The ``o_proj`` of every decoder layer of a HF causal LM, in layer order."""
    decoder = getattr(model, "model", model)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no .model.layers; LoFiT supports Llama-style "
                                    f"models ({', '.join(SUPPORTED_ARCHITECTURES)})")
    try:
        return [layer.self_attn.o_proj for layer in layers]
    except AttributeError as exc:
        raise UnsupportedModelError(f"{type(model).__name__}: decoder layers lack self_attn.o_proj") from exc


def identity_from_model(model: torch.nn.Module, name: str) -> BaseModelIdentity:
    """Identity of an in-memory model; equals the checkpoint's when loaded without loss of precision."""
    fields = _identity_fields(model.config.to_dict())
    weights = [proj.weight for proj in o_proj_modules(model)]
    return BaseModelIdentity(name_or_path=name, fingerprint=_fingerprint(fields, weights), **fields)
