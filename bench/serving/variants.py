"""The variants compared: which adapter (or LoRA) each request of a variant uses, and how a choice is spelled
for the engine (``SamplingParams.extra_args``) and for ``lofit-serve`` (``POST /generate`` fields)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lofit.vllm.contract import extra_args_for

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


def per_row_adapter(i: int) -> Choice:
    """Row ``i`` gets its own adapter (``bench{i % 64}``): ``c`` distinct adapters at concurrency ``c`` <= 64."""
    return (bench_name(i % 64), 1.0)
