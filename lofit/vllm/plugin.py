"""The ``vllm.general_plugins`` entry point: register the LoFiT model wrappers and install the hooks.

vLLM calls :func:`register` in every process it starts (front end, engine core, workers), possibly more
than once; everything here is idempotent. Select a wrapper for an ordinary checkpoint with
``hf_overrides={"architectures": ["LofitLlamaForCausalLM"]}`` (``--hf-overrides`` on the command line).
"""

from __future__ import annotations

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


def wrapper_for(architecture: str) -> str:
    """The LoFiT architecture name to serve a checkpoint of ``architecture`` with."""
    if architecture in WRAPPERS:
        return architecture
    try:
        return BASE_ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(f"LoFiT's vLLM plugin does not support {architecture!r}; supported: "
                         f"{sorted(BASE_ARCHITECTURES)}") from None


def register() -> None:
    from vllm import ModelRegistry

    from lofit.vllm import engine, runner_v1, worker

    runner_v1.install()
    worker.install()
    engine.install()
    supported = set(ModelRegistry.get_supported_archs())
    for name, target in WRAPPERS.items():
        if name not in supported:
            ModelRegistry.register_model(name, target)
