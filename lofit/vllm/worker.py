"""Adapter methods on every vLLM worker, called through ``collective_rpc``.

The plugin adds these methods to vLLM's worker class when it registers (no ``--worker-extension-cls``
needed), so ``llm.collective_rpc("lofit_load", args=(path,))`` loads an adapter directory on every rank.
vLLM runs these calls between engine steps, so they never race a forward pass. Front ends should load
and unload through the engine (``collective_rpc``), which also keeps the engine's admission registry
(:mod:`lofit.vllm.admission`) in step. The method names and answers are listed in
:mod:`lofit.vllm.contract` (``RPC_*``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lofit.adapter import AdapterError, LofitAdapter, adapter_from_bytes, load_adapter
from lofit.vllm.bank import active_bank, has_bank
from lofit.vllm.contract import SELF_TEST_ADAPTER, pinned_reference

V1_RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"  # GPUModelRunner of the V1 runner (CPU build's base)
V2_RUNNER_MODULE = "vllm.v1.worker.gpu.model_runner"  # GPUModelRunner of the V2 runner (GPU default)


def runner_status(runner: Any) -> dict[str, Any]:
    """Which model runner is active and whether its LoFiT hook is installed."""
    modules = {cls.__module__ for cls in type(runner).__mro__}
    status = {"runner": "unknown", "hook": False, "class": f"{type(runner).__module__}.{type(runner).__name__}"}
    if V2_RUNNER_MODULE in modules:
        from lofit.vllm import runner_v2

        status.update(runner="v2", hook=runner_v2.hook_installed(runner))
    elif V1_RUNNER_MODULE in modules:
        from lofit.vllm import runner_v1

        status.update(runner="v1", hook=runner_v1.hook_installed(runner))
    return status


class LofitWorkerMethods:
    """Methods added to vLLM's worker class (they must not clash with the worker's own names)."""

    def lofit_load(self, path: str, pinned: list[str] | None = None) -> dict[str, Any]:
        """Validate the adapter directory against the served model and make it resident under its name
        (``pinned``: content hashes of live requests, never evicted; the engine core adds them)."""
        bank = active_bank()
        adapter = load_adapter(path, expect_base=bank.base)
        return {"name": adapter.name, "content_sha256": bank.load(adapter, pinned or ()),
                "num_heads": adapter.num_heads}

    def lofit_load_bytes(self, name: str, config: bytes, tensors: bytes,
                         pinned: list[str] | None = None) -> dict[str, Any]:
        """Like :meth:`lofit_load`, for an adapter given as the bytes of ``adapter_config.json`` and
        ``adapter.safetensors`` (validated here exactly as a folder is). ``name`` is the adapter's own name, or
        ``name@<content_sha256>`` (its pinned reference) to keep that content under a name of its own."""
        bank = active_bank()
        adapter = adapter_from_bytes(config, tensors, expect_base=bank.base, where=f"adapter {name!r}")
        if name not in (adapter.name, pinned_reference(adapter.name, adapter.content_sha256)):
            raise AdapterError(f"adapter {name!r}: the files hold adapter {adapter.name!r} with content "
                               f"{adapter.content_sha256[:16]}…; load it as its name or as name@<its content_sha256>")
        if name != adapter.name:
            adapter = dataclasses.replace(adapter, name=name)
        return {"name": adapter.name, "content_sha256": bank.load(adapter, pinned or ()),
                "num_heads": adapter.num_heads}

    def lofit_unload(self, name: str, pinned: list[str] | None = None) -> None:
        """Forget an adapter name; requests already admitted with it keep its content until they end."""
        active_bank().unload(name, pinned or ())

    def lofit_list(self) -> dict[str, str]:
        """``{name: content_sha256}`` of the resident adapters."""
        return active_bank().loaded()

    def lofit_status(self) -> dict[str, Any]:
        """Whether this worker serves a LoFiT model, the served model's identity (``BaseModelIdentity.to_dict()``,
        ``None`` without a bank), and its runner and hook (checked at engine start)."""
        base = active_bank().base.to_dict() if has_bank() else None
        return {"bank": has_bank(), "base": base, **runner_status(self.model_runner)}

    def lofit_full_graph_replays(self) -> int:
        """FULL CUDA-graph launches in this worker so far (:mod:`lofit.vllm.graph_replays`)."""
        from lofit.vllm.graph_replays import full_graph_replays

        return full_graph_replays()

    def lofit_load_self_test(self, seed: int = 0) -> dict[str, Any]:
        """Load a strong random adapter on every head (same ``seed``, same content on every rank)."""
        bank = active_bank()
        adapter = LofitAdapter.random(bank.base, SELF_TEST_ADAPTER, "all", seed=seed)
        return {"name": adapter.name, "content_sha256": bank.load(adapter), "num_heads": adapter.num_heads}


def install() -> None:
    """Add the methods to vLLM's worker base class once per process."""
    from vllm.v1.worker.worker_base import WorkerBase

    for name, method in vars(LofitWorkerMethods).items():
        if name.startswith("lofit_") and not hasattr(WorkerBase, name):
            setattr(WorkerBase, name, method)
