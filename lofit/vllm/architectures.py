"""Which decoder families the plugin serves, and the vLLM engine arguments that serve a checkpoint with LoFiT.

A leaf module (vLLM is imported only inside :func:`native_architectures` and :func:`cpu_engine_defaults`):
the entry point (:mod:`lofit.vllm.plugin`), the engine core's start-up check (:mod:`lofit.vllm.selftest`),
:class:`~lofit.vllm.offline.LofitLLM` and ``lofit-serve`` all read the names here.
Select the wrapper for an ordinary checkpoint with ``hf_overrides={"architectures": ["Lofit<Arch>"]}``, e.g.
``LofitLlamaForCausalLM``
(``--hf-overrides`` on the command line); :func:`lofit_engine_args` does that for a local checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lofit.heads import SUPPORTED_ARCHITECTURES

# ``Lofit<Arch>`` serves a checkpoint of vLLM's native architecture ``<Arch>`` with LoFiT steering; the plugin
# registers one per native text-generation architecture, as "lofit.vllm.models:Lofit<Arch>" so that vLLM
# imports (and lofit.vllm.models makes) it lazily in each worker.
WRAPPER_PREFIX = "Lofit"
WRAPPER_MODULE = "lofit.vllm.models"

# the front-end check of the request keys (lofit.vllm.validator), as vLLM's logits_processors take it
VALIDATOR = "lofit.vllm.validator:LofitRequestValidator"


def base_architecture(name: str) -> str | None:
    """``"LofitQwen3ForCausalLM"`` -> ``"Qwen3ForCausalLM"``; ``None`` for a name that is not a wrapper's."""
    base = name[len(WRAPPER_PREFIX):] if name.startswith(WRAPPER_PREFIX) else ""
    return base if base[:1].isupper() else None


def native_architectures() -> set[str]:
    """The architectures vLLM serves natively for text generation (text-only and multimodal models): the
    ones a wrapper can be made for. Imports vLLM."""
    from vllm.model_executor.models import registry

    return set(registry._TEXT_GENERATION_MODELS) | set(registry._MULTIMODAL_MODELS)


def wrapper_for(architecture: str) -> str:
    """The LoFiT architecture name to serve a checkpoint of ``architecture`` with (a wrapper's own name as is).

    Raises ``ValueError`` for an architecture vLLM does not serve natively. Whether the model can be steered
    (not hybrid, heads contiguous at each output projection) is checked when the engine builds it."""
    base = base_architecture(architecture) or architecture
    if base not in native_architectures():
        raise ValueError(f"LoFiT's vLLM plugin serves the architectures vLLM implements natively; {base!r} is not "
                         f"one of them (checked: {', '.join(SUPPORTED_ARCHITECTURES)})")
    return WRAPPER_PREFIX + base


def is_lofit_model(architectures: list[str] | None) -> bool:
    """Whether a model config's ``architectures`` name a LoFiT wrapper."""
    return any(base_architecture(arch) is not None for arch in architectures or [])


def cpu_engine_defaults(kv_cache_gib: int | None = None, *, default_kv_cache_gib: int = 1) -> dict[str, Any]:
    """What vLLM's CPU build needs to start on a small machine, in one place; ``{}`` (and nothing set) elsewhere.

    Sets ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache): ``kv_cache_gib`` when given, else the environment's,
    else ``default_kv_cache_gib``; returns ``{"gpu_memory_utilization": 0.1}`` (vLLM's 0.9 asks the CPU
    backend for 90 % of the machine's memory and start-up fails). Callers keep a value the user gave."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return {}
    if kv_cache_gib is not None:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(default_kv_cache_gib))
    return {"gpu_memory_utilization": 0.1}


def lofit_engine_args(model: str | Path, **engine_args: Any) -> dict[str, Any]:
    """vLLM engine arguments that serve the local checkpoint ``model`` with its LoFiT wrapper and the validator.

    Raises ``FileNotFoundError`` when ``model`` has no ``config.json`` and ``ValueError`` for an unsupported
    architecture."""
    config = Path(model) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{model} is not a local checkpoint directory (no config.json)")
    architectures = json.loads(config.read_text()).get("architectures") or ["?"]
    overrides = {**engine_args.pop("hf_overrides", {}), "architectures": [wrapper_for(architectures[0])]}
    processors = list(engine_args.pop("logits_processors", None) or [])
    return {"model": str(model), "hf_overrides": overrides,
            "logits_processors": processors if VALIDATOR in processors else [*processors, VALIDATOR], **engine_args}
