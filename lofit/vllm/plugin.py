"""The ``vllm.general_plugins`` entry point: register the LoFiT model wrappers under new architecture names.

vLLM calls :func:`register` in every process it starts, possibly more than once; registration is
idempotent. Select a wrapper for an ordinary checkpoint with
``hf_overrides={"architectures": ["LofitLlamaForCausalLM"]}``.
"""

from __future__ import annotations

# new architecture name -> the wrapper, as "module:Class" so vLLM imports it lazily in each worker
WRAPPERS = {
    "LofitLlamaForCausalLM": "lofit.vllm.models:LofitLlamaForCausalLM",
}

# the stock architecture each wrapper serves
BASE_ARCHITECTURES = {"LlamaForCausalLM": "LofitLlamaForCausalLM"}


def register() -> None:
    from vllm import ModelRegistry

    from lofit.vllm import runner_v1

    runner_v1.install()

    supported = set(ModelRegistry.get_supported_archs())
    for name, target in WRAPPERS.items():
        if name not in supported:
            ModelRegistry.register_model(name, target)
