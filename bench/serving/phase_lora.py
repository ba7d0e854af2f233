"""Phase 2, vLLM's multi-LoRA engines and the plugin in the same execution mode (parts ``lora``, ``hotload``):
throughput and latency, adapter load latency through the offline engines, and the engines' memory."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bench.common import make_adapters, make_lora_adapters, percentile
from bench.serving.config import Config, gpu_share
from bench.serving.engine_target import EngineTarget, load_lofit_adapters
from bench.serving.rounds import interleaved
from bench.serving.tables import hotload_table, latency_table, show, throughput_table
from bench.serving.variants import lofit_variants, lora_variants
from lofit.vllm.contract import RPC_LOAD, RPC_UNLOAD


async def phase_lora(cfg: Config, results: dict, paths: list[str]) -> None:
    eager = not cfg.on_gpu  # vLLM's CPU build turns compilation off whenever LoRA is enabled
    mode = "eager" if eager else "compiled + CUDA graphs"
    modes = {"lora-o": "eager (vLLM's CPU build runs LoRA eagerly)" if eager else mode,
             "lora-qkvo": "eager (vLLM's CPU build runs LoRA eagerly)" if eager else mode,
             "plugin-eager": "eager (enforce_eager=True)" if eager else mode}
    count = cfg.distinct
    lora_common = dict(enable_lora=True, max_loras=cfg.max_seqs, max_lora_rank=cfg.lora_rank,
                       max_cpu_loras=cfg.max_seqs + cfg.loads + 1, enforce_eager=eager)
    specs = {"lora-o": ["o_proj"], "lora-qkvo": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    lora_paths = {key: make_lora_adapters(cfg.model, count + cfg.loads, cfg.work / key, targets, cfg.lora_rank,
                                          prefix=f"{key}-")
                  for key, targets in specs.items()}
    share = gpu_share(cfg, 3)
    targets: dict[str, Any] = {}
    try:
        targets["plugin-eager"] = EngineTarget("plugin, same mode", cfg, plugin=True, gpu_share=share,
                                               enforce_eager=eager)
        await load_lofit_adapters(targets["plugin-eager"], paths)
        for key, modules in specs.items():
            vllm_modules = ["o_proj"] if modules == ["o_proj"] else ["qkv_proj", "o_proj"]
            targets[key] = EngineTarget(key, cfg, plugin=False, gpu_share=share, lora_paths=lora_paths[key][:count],
                                        lora_target_modules=vllm_modules, **lora_common)
        results["engines"]["lora"] = {k: {"start_s": t.start_s, "settings": t.settings} for k, t in targets.items()}
        if "lora" in cfg.parts:
            variants = [*lora_variants("lora-o", f"vLLM LoRA r{cfg.lora_rank} o_proj"),
                        *lora_variants("lora-qkvo", f"vLLM LoRA r{cfg.lora_rank} q,k,v,o"),
                        *[v for v in lofit_variants("plugin-eager", "LoFiT plugin") if "per request" not in v.name]]
            rows = await interleaved("lora", variants, targets, cfg)
            results["lora"] = {"mode": mode, "modes": modes, "rows": rows}
            show(f"multi-LoRA vs LoFiT, same execution mode ({mode}): output tokens/s",
                 throughput_table(rows, cfg, modes, column="mode"))
            show("multi-LoRA vs LoFiT: latency", latency_table(rows))
        if "hotload" in cfg.parts:
            from vllm.lora.request import LoRARequest

            hot = results["hotload"]
            extra = make_adapters(cfg.model, cfg.loads, cfg.work / "hot-offline", prefix="hot")
            hot["plugin lofit_load (offline engine, collective_rpc)"] = await time_loads(
                [lambda p=p: targets["plugin-eager"].engine.collective_rpc(RPC_LOAD, args=(p,)) for p in extra])
            for i in range(cfg.loads):
                await targets["plugin-eager"].engine.collective_rpc(RPC_UNLOAD, args=(f"hot{i:02d}",))
            for key in specs:
                engine = targets[key].engine
                fresh = lora_paths[key][count:]
                hot[f"vLLM add_lora, {key} r{cfg.lora_rank} (offline engine)"] = await time_loads(
                    [lambda i=i, p=p, e=engine: e.add_lora(LoRARequest(f"hot-{i}", 10_000 + i, p))
                     for i, p in enumerate(fresh)])
                for i in range(len(fresh)):
                    await engine.remove_lora(10_000 + i)
            show("adapter load latency (offline engines)", hotload_table(hot))
        if "memory" in cfg.parts:
            for key, label in (("plugin-eager", f"offline engine core + worker, plugin {mode}"),
                               ("lora-o", f"offline engine core + worker, vLLM LoRA o_proj, max_loras {cfg.max_seqs}"),
                               ("lora-qkvo", f"offline engine core + worker, vLLM LoRA q,k,v,o, "
                                             f"max_loras {cfg.max_seqs}")):
                results["memory"]["rss"].append({"what": label, **targets[key].memory()})
    finally:
        for target in targets.values():
            target.shutdown()


async def time_loads(calls: list[Callable[[], Any]]) -> dict:
    """Milliseconds of each awaited call, in order; p50 and p99."""
    samples = []
    for call in calls:
        start = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - start) * 1000)
    return {"loads": len(samples), "p50_ms": percentile(samples, 50), "p99_ms": percentile(samples, 99),
            "samples_ms": samples}
