"""The serving benchmark's PNG figures: throughput and latency against concurrency for each part, and the adapter
load latencies."""

from __future__ import annotations

from bench.serving.config import Config


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
