"""The transformers reference as a target: ``generate`` in this process with one LoFiT adapter per batch row
(``lofit.intervene.apply_adapters``), one batch per round."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import greedy_generate, random_token_prompts
from bench.serving.config import Config
from bench.serving.rounds import checked
from bench.serving.variants import Choice


class ReferenceTarget:
    """transformers ``generate`` with one LoFiT adapter per batch row (``lofit.intervene.apply_adapters``)."""

    def __init__(self, cfg: Config, adapter_paths: list[str]) -> None:
        from transformers import AutoModelForCausalLM

        from lofit.adapter import load_adapter
        from lofit.intervene import check_compatible

        self.cfg = cfg
        self.device = "cuda" if cfg.on_gpu else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=getattr(torch, cfg.dtype)).to(self.device)
        self.model.eval()
        self.adapters = {Path(p).name: load_adapter(p) for p in adapter_paths}
        check_compatible(self.model, list(self.adapters.values()))  # once here; not per round
        self.vocab = self.model.config.vocab_size

    async def run(self, count: int, choice: Callable[[int], Choice], seed: int) -> dict:
        from lofit.intervene import apply_adapters

        picks = [choice(i) for i in range(count)]
        adapters = [None if p is None else self.adapters[p[0]] for p in picks]
        strengths = [1.0 if p is None else p[1] for p in picks]
        ids = torch.tensor(random_token_prompts(self.vocab, count, self.cfg.prompt_tokens, seed), device=self.device)
        threads = torch.get_num_threads()
        if self.device == "cpu":
            torch.set_num_threads(self.cfg.reference_threads)
        try:
            with apply_adapters(self.model, adapters, strengths, check_fingerprint=False), torch.inference_mode():
                start = time.perf_counter()
                out = greedy_generate(self.model, ids, self.cfg.output_tokens)
                if self.device == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
        finally:
            torch.set_num_threads(threads)
        tokens = (out.shape[1] - ids.shape[1]) * count
        return checked({"seconds": seconds, "output_tokens": tokens, "output_tokens_per_s": tokens / seconds,
                        "ttft_p50_ms": None, "ttft_p99_ms": None, "itl_p50_ms": None, "itl_p99_ms": None},
                       count, self.cfg)

    def shutdown(self) -> None:
        """Nothing to stop: the model lives in this process."""
