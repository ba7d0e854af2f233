"""The ``vllm.general_plugins`` entry point (``pyproject.toml``): register the LoFiT wrappers, install the hooks.

vLLM calls :func:`register` in every process it starts (front end, engine core, workers), possibly more
than once; everything it calls is idempotent.
"""

from __future__ import annotations


def register() -> None:
    """Install the runner hook, the worker RPCs and the engine-core patches, and register every wrapper of
    :data:`lofit.vllm.architectures.WRAPPERS` with vLLM's ``ModelRegistry``."""
    from vllm import ModelRegistry

    from lofit.vllm import engine_core, runner_v1, worker
    from lofit.vllm.architectures import WRAPPERS

    runner_v1.install()
    worker.install()
    engine_core.install()
    supported = set(ModelRegistry.get_supported_archs())
    for name, target in WRAPPERS.items():
        if name not in supported:
            ModelRegistry.register_model(name, target)
