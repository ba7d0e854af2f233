"""``heads.png``: the layers x heads map of stage-1 scores with the selected heads marked."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def heads_png(scores: torch.Tensor | None, selected: list[tuple[int, int]], num_layers: int, num_heads: int,
              title: str, label: str = "stage-1 score ||A||₂") -> bytes:
    """PNG bytes; without scores (e.g. an adapter made without stage 1) only the selection is drawn.

    ``label`` names what the scores are (ITI draws probe accuracies).
    """
    grid = torch.zeros(num_layers, num_heads) if scores is None else scores.detach().float().cpu()
    width = min(12.0, 2.5 + 0.45 * num_heads)
    height = min(14.0, 1.8 + 0.28 * num_layers)
    fig, ax = plt.subplots(figsize=(width, height), dpi=100)
    image = ax.imshow(grid.numpy(), aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
    if scores is not None:
        fig.colorbar(image, ax=ax, label=label)
    if selected:
        layers, heads = zip(*selected, strict=True)
        ax.scatter(heads, layers, marker="s", s=60, facecolors="none", edgecolors="red", linewidths=1.5,
                   label=f"selected ({len(selected)})")
        ax.legend(loc="upper right", fontsize=8, framealpha=0.8)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(num_heads))
    ax.set_yticks(range(0, num_layers, max(1, num_layers // 15)))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
