"""Which decoder families the plugin serves, and the vLLM engine arguments that serve a checkpoint with LoFiT.

A leaf module (no vLLM import): the entry point (:mod:`lofit.vllm.plugin`), the engine core's start-up check
(:mod:`lofit.vllm.selftest`), :class:`~lofit.vllm.offline.LofitLLM` and ``lofit-serve`` all read the table here.
Select a wrapper for an ordinary checkpoint with ``hf_overrides={"architectures": ["LofitLlamaForCausalLM"]}``
(``--hf-overrides`` on the command line); :func:`lofit_engine_args` does that for a local checkpoint.
"""

from __future__ import annotations

import json
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
