"""Worker extension: adapter load / unload / list on every worker, called through ``collective_rpc``.

Enable it with ``worker_extension_cls="lofit.vllm.worker.LofitWorkerExtension"`` (``--worker-extension-cls``);
then ``llm.collective_rpc("lofit_load", args=(path,))`` loads an adapter directory on every rank. vLLM runs
these calls between engine steps, so they never race a forward pass.
"""

from __future__ import annotations

from typing import Any

from lofit.adapter import load_adapter
from lofit.vllm.bank import active_bank


class LofitWorkerExtension:
    """Methods mixed into vLLM's worker class (they must not clash with the worker's own names)."""

    def lofit_load(self, path: str) -> dict[str, Any]:
        """Validate the adapter directory against the served model and make it resident under its name."""
        bank = active_bank()
        adapter = load_adapter(path, expect_base=bank.base)
        return {"name": adapter.name, "content_sha256": bank.load(adapter), "num_heads": adapter.num_heads}

    def lofit_unload(self, name: str) -> None:
        """Forget an adapter; refused while running requests use it."""
        active_bank().unload(name)

    def lofit_list(self) -> dict[str, str]:
        """``{name: content_sha256}`` of the resident adapters."""
        return active_bank().loaded()
