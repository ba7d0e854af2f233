"""The serving benchmark's goals and their verdicts (PASS/MISS, or ``not run``), from a run's results."""

from __future__ import annotations

from bench.common import md_table
from bench.serving.config import Config
from bench.serving.rounds import row_of


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


def goals_table(results: dict, cfg: Config) -> str:
    """:func:`goals` as a markdown table."""
    return md_table(["goal", "measured", "target", "verdict", "source"], goals(results, cfg))
