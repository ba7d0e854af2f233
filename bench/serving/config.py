"""The serving benchmark's settings: :class:`Config`, its command line, and the environment its engines need."""

from __future__ import annotations

import argparse
import datetime
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lofit.default_model import default_model_dir

REPO = Path(__file__).resolve().parents[2]
PARTS = ("offline", "http", "lora", "reference", "hotload", "memory")
ADMIN_KEY = "bench-admin-" + uuid.uuid4().hex[:8]  # lofit-serve's admin key in this run (the hot-load part)


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
    verbose: bool = False  # vLLM's INFO logs too (see set_environment)
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


def parse_args(argv: list[str] | None = None, description: str | None = None) -> Config:
    """The command line of ``python -m bench.run_all`` (``description``: its help text); changes nothing else."""
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    quick = args.quick
    out = args.out or REPO / "bench" / "results" / (datetime.date.today().isoformat() + ("-quick" if quick else ""))
    return Config(model=args.model, out=out, parts=parts,
                  concurrency=sorted({int(c) for c in args.concurrency.split(",")}),
                  prompt_tokens=args.prompt_tokens or (32 if quick else 128),
                  output_tokens=args.output_tokens or (8 if quick else 64),
                  rounds=args.rounds or (2 if quick else 4), loads=args.loads or (10 if quick else 50),
                  dtype=args.dtype, kv_cache_gib=args.kv_cache_gib, lora_rank=args.lora_rank,
                  reference_threads=args.reference_threads, quick=quick, verbose=args.verbose)


def set_environment(cfg: Config) -> None:
    """vLLM's settings for this process and the engines it starts; call before the first engine starts."""
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # children start clean (see plugins_disabled)
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # the bank measurement is a function RPC
    if not cfg.verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.kv_cache_gib)


def gpu_share(cfg: Config, engines: int) -> float:
    """``gpu_memory_utilization`` for each of ``engines`` engines sharing the machine (CPU: small, unused)."""
    return round(0.85 / engines, 2) if cfg.on_gpu else 0.1
