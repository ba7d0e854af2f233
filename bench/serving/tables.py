"""The markdown tables of the serving benchmark (printed as each part finishes and written to ``results.md``),
and the labels of where each target runs."""

from __future__ import annotations

from bench.common import md_table
from bench.serving.config import Config
from bench.serving.rounds import row_of

OFFLINE_WHERE = {"stock": "vLLM AsyncLLM, LlamaForCausalLM (stock)",
                 "plugin": "vLLM AsyncLLM, LofitLlamaForCausalLM (plugin)"}
HTTP_WHERE = {"vllm": "vLLM OpenAI api_server (stock vLLM)", "lofit": "lofit-serve (plugin)"}


def show(title: str, table: str) -> None:
    print(f"\n### {title}\n\n{table}\n", flush=True)


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


def reference_table(rows: list[dict], cfg: Config) -> str:
    body = []
    for c in cfg.concurrency:
        ref, ours = row_of(rows, "transformers generate + apply_adapters", c), row_of(rows, "plugin (vLLM AsyncLLM)", c)
        if ref and ours:
            body.append([c, min(c, 64), ref["output_tokens_per_s"], ours["output_tokens_per_s"],
                         f"{ours['output_tokens_per_s'] / ref['output_tokens_per_s']:.2f}x"])
    return md_table(["concurrent (batch)", "distinct adapters", "transformers tok/s", "plugin tok/s",
                     "plugin / transformers"], body)


def hotload_table(hot: dict) -> str:
    return md_table(["loader", "loads", "p50 ms", "p99 ms"],
                    [[name, h["loads"], h["p50_ms"], h["p99_ms"]] for name, h in hot.items()], digits=2)


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
