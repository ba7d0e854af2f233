"""Phase 1, the offline engines (parts ``offline``, ``reference``, ``memory``): stock vLLM and the plugin, each an
``AsyncLLM``, up together; the transformers reference against the plugin; the engines' memory."""

from __future__ import annotations

from typing import Any

from bench.serving.config import Config, gpu_share
from bench.serving.engine_target import EngineTarget, load_lofit_adapters
from bench.serving.memory import bank_stats, rss_for_100_loads
from bench.serving.reference_target import ReferenceTarget
from bench.serving.rounds import interleaved
from bench.serving.tables import OFFLINE_WHERE, latency_table, reference_table, show, throughput_table
from bench.serving.variants import Variant, lofit_variants, per_row_adapter

ENGINE_MEMORY_LABEL = {"stock": "offline engine core + worker, stock vLLM",
                       "plugin": "offline engine core + worker, plugin (64 adapters loaded)"}


async def phase_offline(cfg: Config, results: dict, paths: list[str]) -> None:
    share = gpu_share(cfg, 2)
    targets: dict[str, Any] = {}
    try:
        targets["stock"] = EngineTarget("stock vLLM", cfg, plugin=False, gpu_share=share)
        targets["plugin"] = EngineTarget("plugin", cfg, plugin=True, gpu_share=share)
        results["engines"]["offline"] = {k: {"start_s": t.start_s, "settings": t.settings}
                                         for k, t in targets.items()}
        await load_lofit_adapters(targets["plugin"], paths)
        if "offline" in cfg.parts:
            variants = [Variant("stock vLLM (LlamaForCausalLM, no plugin)", "stock", lambda i: None),
                        *lofit_variants("plugin", "plugin")]
            rows = await interleaved("offline", variants, targets, cfg)
            results["offline"] = rows
            show("offline engine (AsyncLLM, streamed): output tokens/s", throughput_table(rows, cfg, OFFLINE_WHERE))
            show("offline engine: latency", latency_table(rows))
        if "reference" in cfg.parts:
            targets["reference"] = ReferenceTarget(cfg, paths)
            variants = [Variant("transformers generate + apply_adapters", "reference", per_row_adapter),
                        Variant("plugin (vLLM AsyncLLM)", "plugin", per_row_adapter)]
            rows = await interleaved("reference", variants, targets, cfg)
            results["reference"] = rows
            show("LoFiT reference path (transformers) vs plugin, one adapter per row",
                 reference_table(rows, cfg))
            del targets["reference"]  # frees the model (no shutdown needed)
        if "memory" in cfg.parts:
            memory = results["memory"]
            for key in ("stock", "plugin"):
                memory["rss"].append({"what": ENGINE_MEMORY_LABEL[key], **targets[key].memory()})
            memory["bank_in_engine"] = (await targets["plugin"].engine.collective_rpc(bank_stats))[0]
            memory["load_100"] = await rss_for_100_loads(targets["plugin"], cfg)
    finally:
        for target in targets.values():
            target.shutdown()
