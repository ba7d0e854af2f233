"""The vLLM plugin. Only modules in this package import vllm; ``bank`` and ``salt`` are plain torch/Python
so they can be tested (and reused) without an engine."""
