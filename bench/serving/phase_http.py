"""Phase 3, the HTTP servers (parts ``http``, ``hotload``, ``memory``): vLLM's OpenAI server on the stock model
and ``lofit-serve``, started together; streamed throughput and latency, ``POST /adapters`` load latency, and
the servers' memory."""

from __future__ import annotations

import asyncio
import shlex

from bench.hot_load import measure_hot_load
from bench.serving.config import ADMIN_KEY, Config, gpu_share
from bench.serving.http_target import HttpTarget
from bench.serving.rounds import interleaved
from bench.serving.tables import HTTP_WHERE, hotload_table, latency_table, show, throughput_table
from bench.serving.variants import Variant, lofit_variants


async def phase_http(cfg: Config, results: dict) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    share = gpu_share(cfg, 2)
    targets: dict[str, HttpTarget] = {}
    try:
        if {"http", "memory"} & set(cfg.parts):  # the hot-load part needs lofit-serve only
            targets["vllm"] = HttpTarget("vLLM OpenAI server (stock)", "vllm", cfg, tokenizer, share)
        targets["lofit"] = HttpTarget("lofit-serve", "lofit", cfg, tokenizer, share)
        for target in targets.values():  # started together, waited for in turn
            target.wait()
        results["engines"]["http"] = {k: {"start_s": t.start_s, "argv": shlex.join(t.argv)} for k, t in targets.items()}
        if "http" in cfg.parts:
            variants = [Variant("vLLM api_server /v1/completions, stock model", "vllm", lambda i: None),
                        *lofit_variants("lofit", "lofit-serve /generate")]
            rows = await interleaved("http", variants, targets, cfg)
            results["http"] = rows
            show("HTTP, streamed: output tokens/s", throughput_table(rows, cfg, HTTP_WHERE, column="server"))
            show("HTTP: latency (client side)", latency_table(rows))
        if "hotload" in cfg.parts:
            table = await asyncio.to_thread(measure_hot_load, targets["lofit"].server.url, ADMIN_KEY,
                                            cfg.work / "adapters", cfg.model, cfg.loads)
            hot = results["hotload"]
            hot["lofit-serve POST /adapters (HTTP, client wall)"] = {
                "loads": table["loads"], "p50_ms": table["http_p50_ms"], "p99_ms": table["http_p99_ms"],
                "samples_ms": table["wall_ms"]}
            hot["lofit-serve POST /adapters (server load_ms)"] = {
                "loads": table["loads"], "p50_ms": table["server_p50_ms"], "p99_ms": table["server_p99_ms"],
                "samples_ms": table["server_ms"]}
            show("adapter load latency", hotload_table(hot))
        if "memory" in cfg.parts:
            results["memory"]["rss"].append({"what": "vLLM OpenAI server, whole process tree (stock)",
                                             **targets["vllm"].memory()})
            results["memory"]["rss"].append({"what": "lofit-serve, whole process tree (64 adapters loaded)",
                                             **targets["lofit"].memory()})
    finally:
        for target in targets.values():
            target.shutdown()
