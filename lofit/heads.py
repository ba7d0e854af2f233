"""Head layout and identity of a base model.

LoFiT acts on the input of each decoder attention layer's output projection (``o_proj``; ``out_proj`` /
``dense`` / ``wo`` in some families): the concatenated per-head attention outputs, where query head ``h``
occupies columns ``[h * head_dim, (h + 1) * head_dim)`` (``head_dim`` is the value head size: MLA's
``v_head_dim``). This module describes that layout for a Hugging Face causal LM (a multimodal checkpoint's
text decoder: its ``text_config``), finds the projections (never a vision or audio tower's), and computes a
fingerprint of the base weights, so an adapter can say exactly which model it was trained on.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.utils.hooks import RemovableHandle

# Decoder families checked token for token against the vLLM plugin (tests/vllm/test_engine_architectures.py).
# Other decoders whose attention feeds a contiguous-heads output projection are steered the same way.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           "Qwen3MoeForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM",
                           "GraniteForCausalLM", "Idefics3ForConditionalGeneration")

# where a decoder layer keeps its attention block, and what the block calls its output projection
ATTENTION_NAMES = ("self_attn", "attn", "attention")
PROJECTION_NAMES = ("o_proj", "out_proj", "dense", "wo")
# module-path words of the non-text towers of multimodal checkpoints, whose attention is never steered
TOWER_WORDS = ("vision", "visual", "audio", "image", "encoder", "siglip", "mm_projector")
_PROJECTION_KEY = re.compile(rf"^(?P<prefix>(?:.*\.)?)layers\.(?P<layer>\d+)\.(?P<block>{'|'.join(ATTENTION_NAMES)})"
                             rf"\.(?P<proj>{'|'.join(PROJECTION_NAMES)})\.weight$")


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


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The text decoder's config: a multimodal checkpoint's ``text_config`` (keeping the top-level
    ``architectures``), else ``config`` itself."""
    inner = config.get("text_config")
    if isinstance(inner, dict) and "num_hidden_layers" in inner and "num_hidden_layers" not in config:
        return {**inner, "architectures": config.get("architectures") or inner.get("architectures")}
    return config


def _head_dim(config: dict[str, Any]) -> int:
    """The width of one head at the output projection's input: MLA's ``v_head_dim``, else ``head_dim``, else
    ``hidden_size / num_attention_heads``."""
    head_dim = config.get("v_head_dim") or config.get("head_dim")
    return int(head_dim) if head_dim else config["hidden_size"] // config["num_attention_heads"]


def _architecture(config: dict[str, Any]) -> str:
    archs = config.get("architectures") or []
    return archs[0] if archs else str(config.get("model_type", "unknown"))


def layout_from_config(config: dict[str, Any] | Any) -> HeadLayout:
    """Head layout from a config dict or a ``transformers.PretrainedConfig``."""
    cfg = text_config(config if isinstance(config, dict) else config.to_dict())
    return HeadLayout(cfg["num_hidden_layers"], cfg["num_attention_heads"], _head_dim(cfg))


def _identity_fields(config: dict[str, Any]) -> dict[str, Any]:
    config = text_config(config)
    missing = [k for k in ("num_hidden_layers", "num_attention_heads", "hidden_size", "vocab_size") if k not in config]
    if missing:
        raise UnsupportedModelError(
            f"{_architecture(config)}: config.json has no {', '.join(missing)}; LoFiT reads a decoder's layout from "
            "these standard transformers fields and its heads from layers.N.<self_attn|attn|attention>.<o_proj|"
            "out_proj|dense|wo> tensors, so models that name them otherwise (GPT-2's n_layer / h.N.attn.c_proj, "
            f"...) are not supported; checked: {', '.join(SUPPORTED_ARCHITECTURES)}")
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


def projection_keys(names: list[str], num_layers: int) -> list[str]:
    """The checkpoint tensor names of the text decoder's attention output projections, layer by layer.

    ``names`` are a checkpoint's tensor names. The projections are ``<prefix>layers.<i>.<block>.<proj>.weight``
    (``block`` in :data:`ATTENTION_NAMES`, ``proj`` in :data:`PROJECTION_NAMES`) for the one prefix that has
    all ``num_layers`` layers and names no vision/audio tower (:data:`TOWER_WORDS`). Raises
    :class:`UnsupportedModelError` naming the first missing tensor, or when no prefix (or several) qualify.
    """
    groups: dict[tuple[str, str, str], dict[int, str]] = {}
    for name in names:
        match = _PROJECTION_KEY.match(name)
        if match and not any(word in match["prefix"].lower() for word in TOWER_WORDS):
            groups.setdefault((match["prefix"], match["block"], match["proj"]), {})[int(match["layer"])] = name
    complete = [group for group in groups.values() if set(range(num_layers)) <= set(group)]
    if len(complete) == 1:
        return [complete[0][layer] for layer in range(num_layers)]
    if not complete and groups:
        (prefix, block, proj), group = max(groups.items(), key=lambda item: len(item[1]))
        first = min(set(range(num_layers)) - set(group))
        raise UnsupportedModelError(f"tensor {prefix}layers.{first}.{block}.{proj}.weight not found; LoFiT needs "
                                    f"an attention output projection (o_proj) in each of the {num_layers} decoder "
                                    "layers")
    found = "none" if not groups else ", ".join(sorted(f"{p}layers.N.{b}.{o}" for p, b, o in groups))
    raise UnsupportedModelError(f"cannot tell the decoder's attention output projections (o_proj) among the "
                                f"checkpoint's tensors (found: {found}); LoFiT supports decoders like "
                                f"{', '.join(SUPPORTED_ARCHITECTURES)}")


def _projection_tensors(model_dir: Path) -> tuple[dict[str, Any], dict[str, Path], list[str]]:
    """The identity fields, tensor files and decoder projection tensor names of a checkpoint (no weights read)."""
    fields = _identity_fields(json.loads((model_dir / "config.json").read_text()))
    files = _checkpoint_tensor_files(model_dir)
    return fields, files, projection_keys(list(files), fields["num_hidden_layers"])


def check_checkpoint(model_dir: str | Path) -> None:
    """Check, from the config and the tensor names only (no weights read), that LoFiT can steer this checkpoint:
    the head layout fields exist and every decoder layer has an attention output projection.

    Raises :class:`UnsupportedModelError` (or ``FileNotFoundError`` without ``config.json``)."""
    _projection_tensors(Path(model_dir))


def identity_from_checkpoint(model_dir: str | Path, name: str | None = None) -> BaseModelIdentity:
    """Identity of a Hugging Face checkpoint directory, read from its files (no model is built).

    Raises :class:`UnsupportedModelError` when the config lacks the layout fields, or the checkpoint has no
    safetensors or no output projection per decoder layer (:func:`projection_keys`)."""
    model_dir = Path(model_dir)
    fields, files, keys = _projection_tensors(model_dir)
    weights = []
    for key in keys:
        with safe_open(files[key], framework="pt") as handle:
            weights.append(handle.get_tensor(key))
    return BaseModelIdentity(name_or_path=name or str(model_dir), fingerprint=_fingerprint(fields, weights),
                             **fields)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The text decoder's layers of a HF causal LM (a multimodal model's language model, never a tower).

    Raises :class:`UnsupportedModelError` when there are none."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise UnsupportedModelError(f"{type(model).__name__} has no decoder layers (.layers); LoFiT supports "
                                    f"decoders like {', '.join(SUPPORTED_ARCHITECTURES)}")
    return layers


def output_projection(layer: torch.nn.Module) -> torch.nn.Linear:
    """A decoder layer's attention output projection (one of :data:`ATTENTION_NAMES` . :data:`PROJECTION_NAMES`).

    Raises :class:`UnsupportedModelError` when the layer has none."""
    for block_name in ATTENTION_NAMES:
        block = getattr(layer, block_name, None)
        for proj_name in PROJECTION_NAMES if block is not None else ():
            proj = getattr(block, proj_name, None)
            if isinstance(proj, torch.nn.Linear):
                return proj
    raise UnsupportedModelError(f"{type(layer).__name__} has no attention output projection (self_attn.o_proj or "
                                "a known equivalent)")


def o_proj_modules(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The attention output projection of every text decoder layer of a HF causal LM, in layer order.

    Raises :class:`UnsupportedModelError` for a model without decoder layers or projections."""
    return [output_projection(layer) for layer in decoder_layers(model)]


def hook_o_proj_inputs(model: torch.nn.Module, layout: HeadLayout,
                       edit: Callable[[int, torch.nn.Module, tuple], Any]) -> list[RemovableHandle]:
    """Register ``edit(layer, module, args)`` as a forward pre-hook on every ``o_proj`` (the LoFiT site); returns
    the handles. Raises :class:`UnsupportedModelError` when ``o_proj``'s input is not ``heads x head_dim``."""
    projs = o_proj_modules(model)
    expected = layout.num_heads * layout.head_dim
    if projs[0].in_features != expected:
        raise UnsupportedModelError(f"o_proj takes {projs[0].in_features} inputs, expected heads x head_dim = "
                                    f"{expected}; the head layout of this model is not contiguous")
    return [proj.register_forward_pre_hook(partial(edit, layer)) for layer, proj in enumerate(projs)]


def identity_from_model(model: torch.nn.Module, name: str) -> BaseModelIdentity:
    """Identity of an in-memory model; equals the checkpoint's when loaded without loss of precision."""
    fields = _identity_fields(model.config.to_dict())
    weights = [proj.weight for proj in o_proj_modules(model)]
    return BaseModelIdentity(name_or_path=name, fingerprint=_fingerprint(fields, weights), **fields)
