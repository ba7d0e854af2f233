"""All serving benchmarks in one run: throughput, latency, LoRA, the transformers reference, hot loads, memory.

    .venv/bin/python -m bench.run_all [--quick] [--only offline,http,lora,reference,hotload,memory]
                                      [--out bench/results/<date>/] [--concurrency 1,16,64] [--rounds 4]
                                      [--prompt-tokens 128] [--output-tokens 64] [--loads 50]

Parts (``--only`` picks some; the default runs all):

* ``offline``   throughput (output tokens/s) and latency (TTFT, ITL; p50/p99) through vLLM's ``AsyncLLM``
                (streamed with ``RequestOutputKind.DELTA``): stock vLLM against the plugin with no adapter,
                1, 16 and 64 distinct adapters, a per-request strength and a two-adapter composition;
* ``http``      the same through HTTP with streaming: vLLM's own OpenAI server on the stock model against
                ``lofit-serve`` (``POST /generate``), both started here as subprocesses;
* ``lora``      vLLM multi-LoRA (rank 8 on ``o_proj``, and on q,k,v,o) with 1/16/64 distinct LoRAs, next to
                the plugin in the same execution mode (eager on vLLM's CPU build, which runs LoRA eagerly);
* ``reference`` LoFiT on transformers ``generate`` with per-row adapters (``lofit.intervene.apply_adapters``)
                against the plugin with the same adapters, at the same batch sizes;
* ``hotload``   adapter load latency: ``POST /adapters`` on ``lofit-serve`` and ``lofit_load`` on the engine,
                next to vLLM's ``add_lora``;
* ``memory``    the adapter bank's size per 100 adapters (computed and measured in the engine) and the RSS of
                the engine processes with and without the plugin.

Everything runs in three phases, each with its own engines up together so that the variants compared with
each other are interleaved in time: every round runs each variant once at each concurrency, round 0 is a
warm-up and dropped, and the median of the other rounds is reported. Prompts are random token ids (text
that tokenises to the same length over HTTP), different for every request, so no prefix-cache hits;
``ignore_eos`` fixes the output length. Stock vLLM and vLLM's LoRA engines run with the LoFiT plugin
left out of ``VLLM_PLUGINS`` in their processes, so they are plain vLLM.

Writes ``results.json``, ``results.md`` (all tables, the machine, the command, the goals with PASS/MISS)
and PNG plots into the results folder; each part prints its table as it finishes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import shlex
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # children start clean (see plugins_disabled)
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # the bank measurement is a function RPC

import torch  # noqa: E402

from bench.common import (  # noqa: E402
    ADAPTER_HEADS,
    Stream,
    child_pids,
    greedy_generate,
    lora_bytes,
    machine_info,
    make_adapters,
    make_lora_adapters,
    md_table,
    median_of,
    percentile,
    random_token_prompts,
    summarise,
    text_prompts,
    tree_memory,
)
from bench.hot_load import measure_hot_load  # noqa: E402
from lofit.default_model import default_model_dir  # noqa: E402
from lofit.vllm.contract import RPC_LOAD, RPC_UNLOAD, extra_args_for  # noqa: E402
from server.launch import ServerProcess, free_port, lofit_serve_argv, without_lofit  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PARTS = ("offline", "http", "lora", "reference", "hotload", "memory")
LLAMA2_7B = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128,
             "hidden_size": 4096}
ADMIN_KEY = "bench-admin-" + uuid.uuid4().hex[:8]


# -- settings ---------------------------------------------------------------------------------------------

@dataclass
class Config:
    model: Path
    out: Path
    parts: list[str]
    concurrency: list[int]
    prompt_tokens: int
    output_tokens: int
    rounds: int
    loads: int
    dtype: str
    kv_cache_gib: int
    lora_rank: int
    reference_threads: int
    quick: bool
    work: Path = Path()  # scratch folder: the adapters this run makes
    on_gpu: bool = field(default_factory=torch.cuda.is_available)

    @property
    def max_seqs(self) -> int:
        return max(self.concurrency)

    @property
    def max_model_len(self) -> int:
        return max(256, self.prompt_tokens + self.output_tokens + 16)

    @property
    def distinct(self) -> int:
        """Adapters to make: enough for the largest concurrency (at least 64, for the 64-distinct variant)."""
        return max(64, self.max_seqs)


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke-sized: 32 prompt and 8 output tokens, 2 rounds (1 measured), 10 loads")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {', '.join(PARTS)}")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results/<date>[-quick]/)")
    parser.add_argument("--model", type=Path, default=default_model_dir())
    parser.add_argument("--concurrency", default="1,16,64", help="concurrent requests, comma-separated")
    parser.add_argument("--prompt-tokens", type=int)
    parser.add_argument("--output-tokens", type=int)
    parser.add_argument("--rounds", type=int, help="rounds per variant including the dropped warm-up round")
    parser.add_argument("--loads", type=int, help="adapter loads timed per loader (hot-load part)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kv-cache-gib", type=int, default=1, help="CPU KV cache per engine (whole GiB)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--verbose", action="store_true", help="vLLM's INFO logs too (default: warnings only)")
    parser.add_argument("--reference-threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="torch threads of the transformers reference on CPU (default: what vLLM's CPU "
                             "worker binds, all cores but one)")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    if not args.verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    quick = args.quick
    out = args.out or REPO / "bench" / "results" / (datetime.date.today().isoformat() + ("-quick" if quick else ""))
    return Config(model=args.model, out=out, parts=parts,
                  concurrency=sorted({int(c) for c in args.concurrency.split(",")}),
                  prompt_tokens=args.prompt_tokens or (32 if quick else 128),
                  output_tokens=args.output_tokens or (8 if quick else 64),
                  rounds=args.rounds or (2 if quick else 4), loads=args.loads or (10 if quick else 50),
                  dtype=args.dtype, kv_cache_gib=args.kv_cache_gib, lora_rank=args.lora_rank,
                  reference_threads=args.reference_threads, quick=quick)


# -- adapter choices and variants -------------------------------------------------------------------------

Choice = Any  # None (no adapter) | (name, strength) | {name: weight} (a LoFiT mix) | int (a LoRA index)


def bench_name(i: int) -> str:
    return f"bench{i:02d}"


def engine_extra_args(choice: Choice) -> dict | None:
    """``SamplingParams.extra_args`` for a LoFiT choice."""
    if isinstance(choice, tuple):
        name, strength = choice
        return extra_args_for(name if strength == 1.0 else {name: strength})
    return extra_args_for(choice)


def http_fields(choice: Choice) -> dict:
    """``POST /generate`` fields for a LoFiT choice."""
    if choice is None:
        return {}
    if isinstance(choice, tuple):
        return {"adapter": choice[0], "adapter_scale": choice[1]}
    return {"adapters": dict(choice)}


@dataclass(frozen=True)
class Variant:
    name: str
    target: str  # the engine or server that runs it
    choice: Callable[[int], Choice]  # request index -> its adapter choice
    distinct: int = 0  # adapters in flight; skipped at a concurrency below this


def lofit_variants(target: str, prefix: str) -> list[Variant]:
    """No adapter, one adapter, 16 and 64 distinct, one adapter at a strength of its own per request (a bank
    row each), a two-adapter mix per request (16 distinct mixes)."""
    return [
        Variant(f"{prefix}, no adapter", target, lambda i: None),
        Variant(f"{prefix}, 1 adapter", target, lambda i: (bench_name(0), 1.0), 1),
        Variant(f"{prefix}, 16 distinct", target, lambda i: (bench_name(i % 16), 1.0), 16),
        Variant(f"{prefix}, 64 distinct", target, lambda i: (bench_name(i % 64), 1.0), 64),
        Variant(f"{prefix}, strength per request", target, lambda i: (bench_name(0), 0.5 + 0.025 * i)),
        Variant(f"{prefix}, mix of 2 per request", target,
                lambda i: {bench_name(i % 16): 1.0, bench_name((i + 1) % 16): 0.5}),
    ]


def lora_variants(target: str, prefix: str) -> list[Variant]:
    return [Variant(f"{prefix}, no LoRA", target, lambda i: None),
            Variant(f"{prefix}, 1 LoRA", target, lambda i: 0, 1),
            Variant(f"{prefix}, 16 distinct", target, lambda i: i % 16, 16),
            Variant(f"{prefix}, 64 distinct", target, lambda i: i % 64, 64)]


# -- targets: what runs one round of concurrent requests ---------------------------------------------------

@contextlib.contextmanager
def plugins_disabled(disable: bool) -> Iterator[None]:
    """LoFiT left out of ``VLLM_PLUGINS`` while an engine starts (when ``disable``): its (spawned) engine core
    and workers are plain vLLM. This process keeps the plugin (loaded once in :func:`run`)."""
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


def checked(result: dict, count: int, cfg: Config) -> dict:
    if result["output_tokens"] != count * cfg.output_tokens:
        raise RuntimeError(f"expected {count * cfg.output_tokens} output tokens, got {result['output_tokens']}")
    return result


class HttpTarget:
    """A server subprocess: ``lofit-serve`` (``POST /generate``) or vLLM's OpenAI server (``/v1/completions``)."""

    def __init__(self, name: str, kind: str, cfg: Config, tokenizer: Any, gpu_share: float) -> None:
        self.name, self.kind, self.cfg, self.tokenizer = name, kind, cfg, tokenizer
        port = free_port()
        common = ["--model", str(cfg.model), "--host", "127.0.0.1", "--dtype", cfg.dtype,
                  "--max-model-len", str(cfg.max_model_len), "--max-num-seqs", str(cfg.max_seqs), "--seed", "0",
                  "--gpu-memory-utilization", str(gpu_share)]
        env = {"VLLM_CPU_KVCACHE_SPACE": str(cfg.kv_cache_gib), "VLLM_WORKER_MULTIPROC_METHOD": "fork"}
        if kind == "lofit":
            argv = lofit_serve_argv(port, [*common, "--adapters-dir", str(cfg.work / "adapters"),
                                           "--admin-key", ADMIN_KEY, "--kv-cache-gib", str(cfg.kv_cache_gib)])
            ready = "/ready"
        else:
            argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--port", str(port), *common,
                    "--served-model-name", "base"]
            env["VLLM_PLUGINS"] = without_lofit()  # plain vLLM
            ready = "/health"
        self.argv = argv
        self.server = ServerProcess(argv, port, cfg.out / "logs" / f"{kind}-server.log", name=name, env=env,
                                    ready_path=ready, cwd=REPO)
        self.start_s = 0.0

    def wait(self) -> None:
        self.start_s = self.server.wait_ready()
        print(f"[server] {self.name} ready in {self.start_s:.0f} s on {self.server.url}", flush=True)

    async def run(self, count: int, choice: Callable[[int], Choice], seed: int) -> dict:
        import httpx

        prompts = text_prompts(self.tokenizer, count, self.cfg.prompt_tokens, seed)
        limits = httpx.Limits(max_connections=count + 8, max_keepalive_connections=count + 8)
        async with httpx.AsyncClient(base_url=self.server.url, timeout=900, limits=limits) as client:

            async def one(i: int) -> Stream:
                sampling = {"max_tokens": self.cfg.output_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
                if self.kind == "lofit":
                    path, body = "/generate", {"prompt": prompts[i], **sampling, **http_fields(choice(i))}
                else:
                    path, body = "/v1/completions", {"model": "base", "prompt": prompts[i], "return_token_ids": True,
                                                     **sampling}
                stream = Stream(time.perf_counter())
                async with client.stream("POST", path, json=body) as response:
                    if response.status_code != 200:
                        raise RuntimeError(f"{self.name}: HTTP {response.status_code}: {await response.aread()}")
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        event = json.loads(line[6:])
                        if self.kind == "lofit":
                            stream.add(len(event.get("token_ids") or []))
                        else:
                            stream.add(sum(len(c.get("token_ids") or []) for c in event.get("choices", [])))
                return stream

            start = time.perf_counter()
            streams = await asyncio.gather(*(one(i) for i in range(count)))
        return checked(summarise(streams, time.perf_counter() - start), count, self.cfg)

    def memory(self) -> dict:
        return tree_memory([self.server.proc.pid])

    def shutdown(self) -> None:
        self.server.stop()


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


# -- the interleaved driver -------------------------------------------------------------------------------

async def interleaved(title: str, variants: list[Variant], targets: dict[str, Any], cfg: Config) -> list[dict]:
    """Every round: each variant once at each concurrency. Round 0 is dropped (unless there is only one)."""
    samples: dict[tuple[str, int], list[dict]] = {}
    for round_index in range(cfg.rounds):
        for c in cfg.concurrency:
            for k, variant in enumerate(variants):
                if variant.distinct > c:
                    continue
                seed = 1_000_003 * round_index + 1009 * c + k
                result = await targets[variant.target].run(c, variant.choice, seed)
                if round_index > 0 or cfg.rounds == 1:
                    samples.setdefault((variant.name, c), []).append(result)
                ttft = result["ttft_p50_ms"]
                print(f"[{title}] round {round_index} c={c:<3d} {variant.name:48s} "
                      f"{result['output_tokens_per_s']:8.1f} tok/s"
                      + (f"  TTFT p50 {ttft:7.1f} ms  ITL p50 {result['itl_p50_ms']:6.1f} ms" if ttft else ""),
                      flush=True)
    return [{"variant": v.name, "target": v.target, "concurrency": c, "rounds": len(samples[v.name, c]),
             **median_of(samples[v.name, c]), "samples": samples[v.name, c]}
            for v in variants for c in cfg.concurrency if (v.name, c) in samples]


def row_of(rows: list[dict], variant: str, concurrency: int) -> dict | None:
    return next((r for r in rows if r["variant"] == variant and r["concurrency"] == concurrency), None)


def throughput_table(rows: list[dict], cfg: Config, where: dict[str, str], column: str = "where") -> str:
    """One row per variant: where it ran, and its output tokens/s at each concurrency (a dash: not run)."""
    body = []
    for name in dict.fromkeys(r["variant"] for r in rows):
        target = next(r["target"] for r in rows if r["variant"] == name)
        cells = [row_of(rows, name, c) for c in cfg.concurrency]
        body.append([name, where.get(target, target), *[r and r["output_tokens_per_s"] for r in cells]])
    return md_table(["variant", column, *[f"tok/s @ {c}" for c in cfg.concurrency]], body)


def latency_table(rows: list[dict]) -> str:
    body = [[r["variant"], r["concurrency"], r["ttft_p50_ms"], r["ttft_p99_ms"], r["itl_p50_ms"], r["itl_p99_ms"]]
            for r in sorted(rows, key=lambda r: r["concurrency"]) if r.get("ttft_p50_ms") is not None]
    return md_table(["variant", "concurrent", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms"], body)


# -- phase 1: offline engines (parts offline, reference, memory) -------------------------------------------

def gpu_share(cfg: Config, engines: int) -> float:
    """``gpu_memory_utilization`` for each of ``engines`` engines sharing the machine (CPU: small, unused)."""
    return round(0.85 / engines, 2) if cfg.on_gpu else 0.1


async def load_lofit_adapters(target: EngineTarget, paths: list[str]) -> None:
    for path in paths:
        await target.engine.collective_rpc(RPC_LOAD, args=(path,))


def bank_stats(worker: Any) -> dict:
    """Runs inside a vLLM worker (sent by ``collective_rpc``): the LoFiT bank's real tensor sizes."""
    from lofit.vllm.bank import active_bank

    bank = active_bank()
    return {"capacity": bank.capacity, "layers": bank.tables.shape[0], "row_width": bank.tables.shape[2],
            "dtype": str(bank.tables.dtype), "tables_bytes": bank.tables.nbytes,
            "token_rows_bytes": bank.token_rows.nbytes, "adapters_loaded": len(bank.loaded())}


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


OFFLINE_WHERE = {"stock": "vLLM AsyncLLM, LlamaForCausalLM (stock)",
                 "plugin": "vLLM AsyncLLM, LofitLlamaForCausalLM (plugin)"}
ENGINE_MEMORY_LABEL = {"stock": "offline engine core + worker, stock vLLM",
                       "plugin": "offline engine core + worker, plugin (64 adapters loaded)"}


def per_row_adapter(i: int) -> Choice:
    """Row ``i`` gets its own adapter (``bench{i % 64}``): ``c`` distinct adapters at concurrency ``c`` <= 64."""
    return (bench_name(i % 64), 1.0)


def reference_table(rows: list[dict], cfg: Config) -> str:
    body = []
    for c in cfg.concurrency:
        ref, ours = row_of(rows, "transformers generate + apply_adapters", c), row_of(rows, "plugin (vLLM AsyncLLM)", c)
        if ref and ours:
            body.append([c, min(c, 64), ref["output_tokens_per_s"], ours["output_tokens_per_s"],
                         f"{ours['output_tokens_per_s'] / ref['output_tokens_per_s']:.2f}x"])
    return md_table(["concurrent (batch)", "distinct adapters", "transformers tok/s", "plugin tok/s",
                     "plugin / transformers"], body)


async def rss_for_100_loads(target: EngineTarget, cfg: Config) -> dict:
    """RSS of the plugin engine's processes before and after loading 100 more adapters (then unloaded)."""
    paths = make_adapters(cfg.model, 100, cfg.work / "extra", prefix="extra")
    before = target.memory()
    await load_lofit_adapters(target, paths)
    after = target.memory()
    for i in range(100):
        await target.engine.collective_rpc(RPC_UNLOAD, args=(f"extra{i:02d}",))
    return {"rss_before_mib": before["rss_mib"], "rss_after_mib": after["rss_mib"],
            "pss_before_mib": before["pss_mib"], "pss_after_mib": after["pss_mib"]}


# -- phase 2: LoRA engines and the plugin in the same mode (parts lora, hotload) ---------------------------

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


def hotload_table(hot: dict) -> str:
    return md_table(["loader", "loads", "p50 ms", "p99 ms"],
                    [[name, h["loads"], h["p50_ms"], h["p99_ms"]] for name, h in hot.items()], digits=2)


# -- phase 3: HTTP servers (parts http, hotload, memory) ---------------------------------------------------

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


HTTP_WHERE = {"vllm": "vLLM OpenAI api_server (stock vLLM)", "lofit": "lofit-serve (plugin)"}


# -- memory: the bank, computed ---------------------------------------------------------------------------

def bank_rows_computed(cfg: Config) -> list[list]:
    """MiB per 100 adapters: bank table rows (one per live adapter combination, model dtype) plus adapter
    content (K = 3 % of the heads: K x head_dim fp32 offsets + int64 head ids), next to rank-r LoRA weights."""
    config = json.loads((cfg.model / "config.json").read_text())
    width = torch.tensor([], dtype=getattr(torch, cfg.dtype)).element_size()
    rows = []
    for name, c in ((cfg.model.name, config), ("Llama-2-7B", LLAMA2_7B)):
        head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        heads = round(0.03 * c["num_hidden_layers"] * c["num_attention_heads"])  # K = 3 % of the heads
        table = 100 * c["num_hidden_layers"] * c["num_attention_heads"] * head_dim * width
        content = 100 * heads * (head_dim * 4 + 2 * 8)
        rows.append([name, "LoFiT bank rows (100 rows)", table / 2**20])
        rows.append([name, f"LoFiT adapter content (100 x {heads} heads = 3 %)", content / 2**20])
        for label, targets in (("o_proj", ["o_proj"]), ("q,k,v,o", ["q_proj", "k_proj", "v_proj", "o_proj"])):
            size = 100 * lora_bytes(c, targets, cfg.lora_rank, width)
            rows.append([name, f"LoRA r{cfg.lora_rank} {label} (100 adapters)", size / 2**20])
    return rows


def memory_tables(memory: dict) -> str:
    parts = [md_table(["model", "what (per 100 adapters, computed)", "MiB"], memory["computed"], digits=2)]
    bank = memory.get("bank_in_engine")
    if bank:
        per_row = bank["tables_bytes"] / bank["capacity"]
        parts.append(md_table(["measured in the plugin engine's worker", "value"], [
            ["bank capacity (rows = max_num_seqs + 1)", bank["capacity"]],
            ["tables (layers x capacity x heads*head_dim, " + bank["dtype"] + ")",
             f"{bank['tables_bytes'] / 2**20:.2f} MiB"],
            ["per 100 rows", f"{100 * per_row / 2**20:.2f} MiB"],
            ["token-row buffer", f"{bank['token_rows_bytes'] / 2**10:.1f} KiB"],
            ["adapters loaded", bank["adapters_loaded"]]]))
    load = memory.get("load_100")
    if load:
        parts.append(md_table(["plugin engine RSS, loading 100 more adapters", "before MiB", "after MiB", "delta MiB"],
                              [["RSS", load["rss_before_mib"], load["rss_after_mib"],
                                load["rss_after_mib"] - load["rss_before_mib"]],
                               ["PSS", load["pss_before_mib"], load["pss_after_mib"],
                                load["pss_after_mib"] - load["pss_before_mib"]]]))
    if memory["rss"]:
        parts.append(md_table(["process tree", "processes", "RSS MiB", "PSS MiB"],
                              [[m["what"], m["processes"], m["rss_mib"], m["pss_mib"]] for m in memory["rss"]]))
        parts.append(md_table(["process tree", "process", "RSS MiB", "PSS MiB"],
                              [[m["what"], p["name"], p["rss_mib"], p["pss_mib"]]
                               for m in memory["rss"] for p in m.get("each", [])]))
    return "\n\n".join(parts)


# -- goals, report, plots ---------------------------------------------------------------------------------

def goals(results: dict, cfg: Config) -> list[list]:
    """``[goal, measured, target, verdict, source]`` for each goal (``not run`` when its part did not run)."""
    top = max(cfg.concurrency)

    def tps(rows: list[dict] | None, variant: str) -> float | None:
        row = row_of(rows or [], variant, top)
        return None if row is None else row["output_tokens_per_s"]

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a / b

    off, http, ref = results.get("offline"), results.get("http"), results.get("reference")
    hot = results.get("hotload", {}).get("lofit-serve POST /adapters (HTTP, client wall)")
    items = [
        ("plugin 16 distinct / stock", ratio(tps(off, "plugin, 16 distinct"),
                                              tps(off, "stock vLLM (LlamaForCausalLM, no plugin)")),
         ">= 0.97", lambda v: v >= 0.97, f"offline engine, {top} concurrent"),
        ("plugin 64 distinct / 1 distinct", ratio(tps(off, "plugin, 64 distinct"), tps(off, "plugin, 1 adapter")),
         ">= 0.97", lambda v: v >= 0.97, f"offline engine, {top} concurrent"),
        ("plugin / transformers reference", ratio(tps(ref, "plugin (vLLM AsyncLLM)"),
                                                  tps(ref, "transformers generate + apply_adapters")),
         ">= 5x", lambda v: v >= 5, f"{top} concurrent, {min(top, 64)} distinct adapters"),
        ("hot-load p50 (HTTP)", None if hot is None else hot["p50_ms"], "<= 50 ms", lambda v: v <= 50,
         f"lofit-serve POST /adapters, {cfg.loads} loads"),
        ("lofit-serve 16 distinct / vLLM api_server (informational)",
         ratio(tps(http, "lofit-serve /generate, 16 distinct"),
               tps(http, "vLLM api_server /v1/completions, stock model")),
         ">= 0.97", lambda v: v >= 0.97, f"HTTP, {top} concurrent"),
        ("lofit-serve 64 distinct / 1 adapter (informational)",
         ratio(tps(http, "lofit-serve /generate, 64 distinct"), tps(http, "lofit-serve /generate, 1 adapter")),
         ">= 0.97", lambda v: v >= 0.97, f"HTTP, {top} concurrent"),
    ]
    out = []
    for name, value, target, ok, source in items:
        if value is None:
            out.append([name, "not run", target, "—", source])
        else:
            shown = f"{value:.1f} ms" if name.startswith("hot-load") else f"{value:.3f}"
            out.append([name, shown, target, "PASS" if ok(value) else "MISS", source])
    return out


def show(title: str, table: str) -> None:
    print(f"\n### {title}\n\n{table}\n", flush=True)


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
             "## Goals", "", md_table(["goal", "measured", "target", "verdict", "source"], goals(results, cfg)), ""]
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


def plots(results: dict, cfg: Config) -> list[str]:
    """PNG figures: throughput and latency against concurrency, the reference ratio, load latencies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    curves = [("offline", results.get("offline")), ("http", results.get("http")),
              ("lora", (results.get("lora") or {}).get("rows")), ("reference", results.get("reference"))]
    for name, rows in curves:
        if not rows:
            continue
        fig, axes = plt.subplots(1, 3, figsize=(17, 5))
        for variant in dict.fromkeys(r["variant"] for r in rows):
            mine = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["concurrency"])
            xs = [r["concurrency"] for r in mine]
            axes[0].plot(xs, [r["output_tokens_per_s"] for r in mine], marker="o", label=variant)
            if mine[0].get("ttft_p50_ms") is not None:
                axes[1].plot(xs, [r["ttft_p50_ms"] for r in mine], marker="o", label=variant)
                axes[2].plot(xs, [r["itl_p50_ms"] for r in mine], marker="o", label=variant)
        for ax, label in zip(axes, ("output tokens/s", "TTFT p50 (ms)", "ITL p50 (ms)"), strict=True):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent requests")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{name}: {cfg.model.name}, {cfg.prompt_tokens}+{cfg.output_tokens} tokens")
        fig.tight_layout()
        path = cfg.out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)
    if results.get("hotload"):
        fig, ax = plt.subplots(figsize=(9, 4.5))
        hot = results["hotload"]
        ax.boxplot([h["samples_ms"] for h in hot.values()], orientation="horizontal")
        ax.set_yticks(range(1, len(hot) + 1), [name for name in hot], fontsize=7)
        ax.axvline(50, color="red", linestyle="--", label="goal p50 <= 50 ms")
        ax.set_xscale("log")
        ax.set_xlabel("load latency (ms)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(cfg.out / "hotload.png", dpi=110)
        plt.close(fig)
        written.append("hotload.png")
    return written


# -- main -------------------------------------------------------------------------------------------------

def save(results: dict, cfg: Config) -> None:
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (cfg.out / "results.md").write_text(report(results, cfg))


async def run(cfg: Config) -> dict:
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # here, once, with the LoFiT plugin: stock engines only hide it from their children
    results: dict[str, Any] = {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": shlex.join([".venv/bin/python", "-m", "bench.run_all", *sys.argv[1:]]),
        "machine": machine_info(), "settings": {k: str(v) for k, v in vars(cfg).items()},
        "engines": {}, "hotload": {}, "errors": {},
        "memory": {"computed": bank_rows_computed(cfg), "rss": []}}
    paths = make_adapters(cfg.model, cfg.distinct, cfg.work / "adapters")
    phases = [("offline", {"offline", "reference", "memory"}, lambda: phase_offline(cfg, results, paths)),
              ("lora", {"lora", "hotload"}, lambda: phase_lora(cfg, results, paths)),
              ("http", {"http", "hotload", "memory"}, lambda: phase_http(cfg, results))]
    for name, needs, phase in phases:
        if not needs & set(cfg.parts):
            continue
        print(f"\n=== phase {name} ===", flush=True)
        started = time.perf_counter()
        try:
            await phase()
        except Exception:  # noqa: BLE001 - record it, go on with the other phases
            results["errors"][name] = traceback.format_exc()
            print(f"[{name}] FAILED:\n{results['errors'][name]}", flush=True)
        results.setdefault("phase_seconds", {})[name] = time.perf_counter() - started
        save(results, cfg)
    if "memory" in cfg.parts:
        show("memory", memory_tables(results["memory"]))
    return results


def main() -> None:
    cfg = parse_args()
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.kv_cache_gib)
    cfg.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lofit-bench-") as work:
        cfg.work = Path(work)
        results = asyncio.run(run(cfg))
    results["plots"] = plots(results, cfg)
    save(results, cfg)
    show("goals", md_table(["goal", "measured", "target", "verdict", "source"], goals(results, cfg)))
    print(f"wrote {cfg.out / 'results.md'}, {cfg.out / 'results.json'} and {', '.join(results['plots'])}")


if __name__ == "__main__":
    main()
