"""The interleaved rounds: every round runs each variant once at each concurrency on its target; the warm-up
round is dropped and the median of the others kept. Also the check every round's result passes."""

from __future__ import annotations

from typing import Any

from bench.common import median_of
from bench.serving.config import Config
from bench.serving.variants import Variant


def checked(result: dict, count: int, cfg: Config) -> dict:
    """``result`` when its ``count`` requests produced all their output tokens; raises otherwise."""
    if result["output_tokens"] != count * cfg.output_tokens:
        raise RuntimeError(f"expected {count * cfg.output_tokens} output tokens, got {result['output_tokens']}")
    return result


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
    """The result row of ``variant`` at ``concurrency`` (None: not run)."""
    return next((r for r in rows if r["variant"] == variant and r["concurrency"] == concurrency), None)
