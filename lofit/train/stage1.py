"""Stage 1: learn a scale ``A`` on every head with an L1 penalty, rank heads by ``||A||_2``."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from lofit.adapter import AdapterError, LofitAdapter
from lofit.heads import HeadLayout
from lofit.train.data import Encoded
from lofit.train.loop import StageHistory, optimise
from lofit.train.objective import Objective
from lofit.train.parameters import LofitParameters

RANKING_KEPT = 160  # the reference saves the top 160 heads of the ranking


@dataclass
class HeadSelection:
    """Stage-1 result: per-head scores, the ranking, the learned scales and the history."""

    scores: torch.Tensor | None  # [L, H] = ||A[l, h]||_2; None when reused from an adapter without them
    scales: torch.Tensor | None  # [L, H, d] = A; None when reused from an adapter
    ranking: list[tuple[int, int]]  # heads by descending score (at most RANKING_KEPT)
    history: StageHistory

    def top(self, k: int) -> list[tuple[int, int]]:
        """The ``k`` best heads as ``(layer, head)``, best first."""
        return self.ranking[:k]


def rank_heads(scores: torch.Tensor, keep: int = RANKING_KEPT) -> list[tuple[int, int]]:
    """Heads by descending score, flattened layer-major; ties keep the lower (layer, head) first."""
    num_heads = scores.shape[1]
    order = torch.argsort(scores.flatten(), descending=True, stable=True)[:keep]
    return [(int(i) // num_heads, int(i) % num_heads) for i in order]


def select_heads(objective: Objective, layout: HeadLayout, train: list[tuple[Encoded, ...]],
                 val: list[tuple[Encoded, ...]], *, lr: float, l1: float, epochs: int, init_std: float,
                 seed: int, batch_size: int, grad_accum: int, max_grad_norm: float,
                 progress: bool = True) -> HeadSelection:
    """Train ``A ~ N(0, init_std)`` (float32 ``[L, H, d]``) on all heads with ``task loss + l1 * sum|A|``
    (Yin et al., 2024, §3.1, eq. 2); return the heads ranked by ``||A[l, h]||_2``. ``A`` is drawn on the CPU
    generator, so every rank of a distributed run starts from the same values."""
    torch.manual_seed(seed)
    init = torch.randn(layout.num_layers, layout.num_heads, layout.head_dim) * init_std
    lofit = LofitParameters(layout, scales=init).to(objective.device)
    with lofit.attach(objective.model):
        objective.precompute_reference(train, batch_size)
        objective.precompute_reference(val, batch_size)
        history = optimise(lofit.trainable(), objective, train, val, lr=lr, epochs=epochs, batch_size=batch_size,
                           grad_accum=grad_accum, max_grad_norm=max_grad_norm, seed=seed,
                           penalty=lambda: l1 * lofit.scales.abs().sum(), desc="stage 1: select heads",
                           progress=progress, lr_flag="--lr-a")
    objective.dist.check_same(lofit.trainable())
    learned = lofit.scales.detach().float().cpu()
    scores = learned.norm(dim=-1)
    return HeadSelection(scores=scores, scales=learned, ranking=rank_heads(scores), history=history)


def random_selection(layout: HeadLayout, k: int, seed: int) -> HeadSelection:
    """K distinct heads drawn uniformly at random (seeded); stage 1 is not run (the localisation ablation)."""
    every = [(layer, head) for layer in range(layout.num_layers) for head in range(layout.num_heads)]
    return HeadSelection(scores=None, scales=None, ranking=random.Random(seed).sample(every, k),
                         history=StageHistory())


def selection_from_adapter(adapter: LofitAdapter, layout: HeadLayout) -> HeadSelection:
    """Reuse the stage-1 result recorded in another adapter (e.g. heads chosen on a different task).

    Uses its recorded ranking and score map when present, else its heads; stage 1 is not run.
    """
    recorded = adapter.metadata.get("selection") or {}
    ranking = [(int(layer), int(head)) for layer, head in recorded.get("ranking") or adapter.head_list()]
    scores = None if recorded.get("scores") is None else torch.tensor(recorded["scores"], dtype=torch.float32)
    if scores is not None and scores.shape != (layout.num_layers, layout.num_heads):
        raise AdapterError(f"adapter {adapter.name!r}: recorded scores have shape {list(scores.shape)}, "
                           f"expected [{layout.num_layers}, {layout.num_heads}]")
    return HeadSelection(scores=scores, scales=None, ranking=ranking, history=StageHistory())
