"""A run's report: ``results.md`` (the machine, the command, the settings, the goals with PASS/MISS and every
part's tables) and ``results.json`` (everything measured), written into the results folder."""

from __future__ import annotations

import json

from bench.common import ADAPTER_HEADS
from bench.serving.config import Config
from bench.serving.goals import goals_table
from bench.serving.tables import (
    HTTP_WHERE,
    OFFLINE_WHERE,
    hotload_table,
    latency_table,
    memory_tables,
    reference_table,
    throughput_table,
)


def report(results: dict, cfg: Config) -> str:
    m = results["machine"]
    rounds = (f"{cfg.rounds} rounds (the first dropped, median of the rest)" if cfg.rounds > 1
              else "1 round (no warm-up dropped)")
    lines = [f"# LoFiT serving benchmarks — {results['started']}", "",
             f"Command: `{results['command']}`", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, GPU {m['gpu'] or 'none'}; "
             f"torch {m['torch']}, vLLM {m['vllm']}, Python {m['python']}; load average at start "
             f"{', '.join(f'{x:.1f}' for x in m.get('load_average', ()))}.", "",
             f"Settings: model `{cfg.model.name}` ({cfg.dtype}), prompts {cfg.prompt_tokens} tokens, outputs "
             f"{cfg.output_tokens} tokens (`ignore_eos`), concurrency {', '.join(map(str, cfg.concurrency))}, "
             f"{rounds}, adapters of {ADAPTER_HEADS} heads, "
             f"LoRA rank {cfg.lora_rank}, KV cache {cfg.kv_cache_gib} GiB per CPU engine"
             + (", **quick (smoke) run**" if cfg.quick else "") + ".", "",
             "## Goals", "", goals_table(results, cfg), ""]
    if "offline" in results:
        lines += ["## Offline engine (AsyncLLM, streamed)", "",
                  throughput_table(results["offline"], cfg, OFFLINE_WHERE), "", latency_table(results["offline"]), ""]
    if "http" in results:
        lines += ["## HTTP (streamed; client-side latency)", "",
                  throughput_table(results["http"], cfg, HTTP_WHERE, column="server"), "",
                  latency_table(results["http"]), ""]
    if "lora" in results:
        lora = results["lora"]
        lines += [f"## vLLM multi-LoRA vs LoFiT (both {lora['mode']})", "",
                  throughput_table(lora["rows"], cfg, lora["modes"], column="mode"),
                  "", latency_table(results["lora"]["rows"]), ""]
    if "reference" in results:
        lines += ["## Reference path (transformers generate, per-row adapters) vs plugin", "",
                  reference_table(results["reference"], cfg), "",
                  f"transformers on {'GPU' if cfg.on_gpu else f'CPU with {cfg.reference_threads} torch thread(s)'}.",
                  ""]
    if results.get("hotload"):
        lines += ["## Adapter load latency", "", hotload_table(results["hotload"]), ""]
    if "memory" in cfg.parts:
        lines += ["## Memory", "", memory_tables(results["memory"]), ""]
    if results["errors"]:
        lines += ["## Errors", ""]
        lines += [f"* {phase}: `{err.splitlines()[-1]}`" for phase, err in results["errors"].items()]
    return "\n".join(lines) + "\n"


def save(results: dict, cfg: Config) -> None:
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (cfg.out / "results.md").write_text(report(results, cfg))
