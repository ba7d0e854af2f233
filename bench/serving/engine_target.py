"""An offline engine as a target: one ``AsyncLLM`` (engine core and workers in their own processes), stock vLLM,
the LoFiT plugin or vLLM's multi-LoRA, driven with streamed requests (``RequestOutputKind.DELTA``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from bench.common import Stream, child_pids, random_token_prompts, summarise, tree_memory
from bench.serving.config import Config
from bench.serving.rounds import checked
from bench.serving.variants import Choice, engine_extra_args
from lofit.vllm.contract import RPC_LOAD
from server.launch import without_lofit


@contextlib.contextmanager
def plugins_disabled(disable: bool) -> Iterator[None]:
    """LoFiT left out of ``VLLM_PLUGINS`` while an engine starts (when ``disable``): its (spawned) engine core
    and workers are plain vLLM. This process keeps the plugin (loaded once in ``bench.run_all.run``)."""
    old = os.environ.get("VLLM_PLUGINS")
    if disable:
        os.environ["VLLM_PLUGINS"] = without_lofit()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("VLLM_PLUGINS", None)
        else:
            os.environ["VLLM_PLUGINS"] = old


class EngineTarget:
    """One ``AsyncLLM`` (engine core and workers in their own processes); LoFiT or LoRA choices."""

    def __init__(self, name: str, cfg: Config, *, plugin: bool, gpu_share: float, lora_paths: list[str] | None = None,
                 **engine_args: Any) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from lofit.vllm.architectures import lofit_engine_args

        self.name, self.cfg, self.plugin, self.lora_paths = name, cfg, plugin, lora_paths or []
        common = dict(dtype=cfg.dtype, max_model_len=cfg.max_model_len, max_num_seqs=cfg.max_seqs, seed=0,
                      gpu_memory_utilization=gpu_share, disable_log_stats=True, **engine_args)
        args = lofit_engine_args(cfg.model, **common) if plugin else {"model": str(cfg.model), **common}
        self.settings = {k: str(v) for k, v in args.items()}
        before = child_pids()
        start = time.perf_counter()
        with plugins_disabled(not plugin):
            self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        self.start_s = time.perf_counter() - start
        self.pids = sorted(pid for pid in child_pids() - before if not _is_resource_tracker(pid))
        self.vocab = json.loads((cfg.model / "config.json").read_text())["vocab_size"]
        print(f"[engine] {name} up in {self.start_s:.0f} s (processes {self.pids})", flush=True)

    def lora_request(self, index: int):
        from vllm.lora.request import LoRARequest

        return LoRARequest(f"{self.name}-{index:02d}", index + 1, self.lora_paths[index])

    async def run(self, count: int, choice: Callable[[int], Choice], seed: int) -> dict:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        prompts = random_token_prompts(self.vocab, count, self.cfg.prompt_tokens, seed)

        async def one(i: int) -> Stream:
            picked = choice(i)
            lora = self.lora_request(picked) if isinstance(picked, int) else None
            params = SamplingParams(temperature=0, max_tokens=self.cfg.output_tokens, ignore_eos=True,
                                    extra_args=None if lora is not None else engine_extra_args(picked),
                                    output_kind=RequestOutputKind.DELTA)
            stream = Stream(time.perf_counter())
            async for out in self.engine.generate(TokensPrompt(prompt_token_ids=prompts[i]), params,
                                                  uuid.uuid4().hex, lora_request=lora):
                stream.add(len(out.outputs[0].token_ids))
            return stream

        start = time.perf_counter()
        streams = await asyncio.gather(*(one(i) for i in range(count)))
        return checked(summarise(streams, time.perf_counter() - start), count, self.cfg)

    def memory(self) -> dict:
        return tree_memory(self.pids)

    def shutdown(self) -> None:
        self.engine.shutdown()


def _is_resource_tracker(pid: int) -> bool:
    import psutil

    try:
        return "resource_tracker" in " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return True


async def load_lofit_adapters(target: EngineTarget, paths: list[str]) -> None:
    """Loads LoFiT adapters into a plugin engine's workers, one ``collective_rpc`` each."""
    for path in paths:
        await target.engine.collective_rpc(RPC_LOAD, args=(path,))
