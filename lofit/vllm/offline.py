"""Offline batched generation with a per-prompt adapter: a thin front over ``vllm.LLM``.

Example::

    from lofit.vllm.offline import LofitLLM

    llm = LofitLLM("models/SmolLM2-135M-Instruct", adapters=["adapters/truthfulqa"])
    outputs = llm.generate(["Q: Can pigs fly? A:"] * 3, SamplingParams(max_tokens=32),
                           adapters=[None, "truthfulqa", {"truthfulqa": 2.0}])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lofit.vllm.architectures import lofit_engine_args
from lofit.vllm.contract import RPC_LIST, RPC_LOAD, RPC_UNLOAD, AdapterChoice, extra_args_for

__all__ = ["LofitLLM"]


class LofitLLM:
    """``vllm.LLM`` serving a checkpoint with LoFiT steering; each prompt may pick its own adapter."""

    def __init__(self, model: str | Path, adapters: Sequence[str | Path] = (), **engine_args: Any) -> None:
        from vllm import LLM

        self.llm = LLM(**lofit_engine_args(model, **engine_args))
        for path in adapters:
            self.load(path)

    def load(self, path: str | Path) -> dict[str, Any]:
        """Load (or reload) the adapter directory ``path`` on every worker; returns its name and content hash."""
        return self.llm.collective_rpc(RPC_LOAD, args=(str(path),))[0]

    def unload(self, name: str) -> None:
        """Forget ``name``; requests already admitted with it finish with its content."""
        self.llm.collective_rpc(RPC_UNLOAD, args=(name,))

    def adapters(self) -> dict[str, str]:
        """``{name: content_sha256}`` of the loaded adapters."""
        return self.llm.collective_rpc(RPC_LIST)[0]

    def generate(self, prompts: str | Sequence[Any], sampling_params: Any = None,
                 adapters: AdapterChoice | Sequence[AdapterChoice] = None, use_tqdm: bool = False) -> list:
        """Generate for every prompt; ``adapters`` is one choice for all prompts or one per prompt."""
        from vllm import SamplingParams

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if adapters is None or isinstance(adapters, str | dict):
            choices = [adapters] * len(prompts)
        else:
            choices = list(adapters)
            if len(choices) != len(prompts):
                raise ValueError(f"{len(choices)} adapter choices for {len(prompts)} prompts")
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        per_prompt = []
        for choice, base in zip(choices, params, strict=True):
            one = (base or SamplingParams()).clone()
            extra = extra_args_for(choice)
            if extra is not None:
                one.extra_args = {**(one.extra_args or {}), **extra}
            per_prompt.append(one)
        return self.llm.generate(prompts, per_prompt, use_tqdm=use_tqdm)
