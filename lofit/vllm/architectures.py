"""Which decoder families the plugin serves, and the vLLM engine arguments that serve a checkpoint with LoFiT.

A leaf module (vLLM is imported only inside :func:`cpu_engine_defaults`): the entry point
(:mod:`lofit.vllm.plugin`), the engine core's start-up check (:mod:`lofit.vllm.selftest`),
:class:`~lofit.vllm.offline.LofitLLM` and ``lofit-serve`` all read the table here.
Select a wrapper for an ordinary checkpoint with ``hf_overrides={"architectures": ["LofitLlamaForCausalLM"]}``
(``--hf-overrides`` on the command line); :func:`lofit_engine_args` does that for a local checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# new architecture name -> the wrapper, as "module:Class" so vLLM imports it lazily in each worker
WRAPPERS = {
    "LofitLlamaForCausalLM": "lofit.vllm.models:LofitLlamaForCausalLM",
    "LofitMistralForCausalLM": "lofit.vllm.models:LofitMistralForCausalLM",
    "LofitQwen2ForCausalLM": "lofit.vllm.models:LofitQwen2ForCausalLM",
}

# the stock architecture each wrapper serves
BASE_ARCHITECTURES = {
    "LlamaForCausalLM": "LofitLlamaForCausalLM",
    "MistralForCausalLM": "LofitMistralForCausalLM",
    "Qwen2ForCausalLM": "LofitQwen2ForCausalLM",
}

# the front-end check of the request keys (lofit.vllm.validator), as vLLM's logits_processors take it
VALIDATOR = "lofit.vllm.validator:LofitRequestValidator"


def wrapper_for(architecture: str) -> str:
    """The LoFiT architecture name to serve a checkpoint of ``architecture`` with.

    Raises ``ValueError`` for an architecture the plugin has no wrapper for."""
    if architecture in WRAPPERS:
        return architecture
    try:
        return BASE_ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(f"LoFiT's vLLM plugin does not support {architecture!r}; supported: "
                         f"{sorted(BASE_ARCHITECTURES)}") from None


def is_lofit_model(architectures: list[str] | None) -> bool:
    """Whether a model config's ``architectures`` name one of the LoFiT wrappers."""
    return any(arch in WRAPPERS for arch in architectures or [])


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
