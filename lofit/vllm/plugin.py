"""The ``vllm.general_plugins`` entry point (``pyproject.toml``): register the LoFiT wrappers, install the hooks.

vLLM calls :func:`register` in every process it starts (front end, engine core, workers), possibly more
than once; everything it calls is idempotent.
"""

from __future__ import annotations


def register() -> None:
    """Install the runner hook, the FULL-graph replay counter, the worker RPCs and the engine-core patches, and
    register ``Lofit<Arch>`` with vLLM's ``ModelRegistry`` for every native text-generation architecture
    (lazily imported from :mod:`lofit.vllm.models`, which makes the class on demand)."""
    from vllm import ModelRegistry

    from lofit.vllm import engine_core, graph_replays, runner_v1, worker
    from lofit.vllm.architectures import WRAPPER_MODULE, WRAPPER_PREFIX, native_architectures

    runner_v1.install()
    graph_replays.install()
    worker.install()
    engine_core.install()
    registered = set(ModelRegistry.get_supported_archs())
    for arch in sorted(native_architectures()):
        name = WRAPPER_PREFIX + arch
        if name not in registered:
            ModelRegistry.register_model(name, f"{WRAPPER_MODULE}:{name}")
