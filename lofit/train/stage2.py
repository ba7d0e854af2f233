"""Stage 2: on the selected heads only, learn offsets ``v`` (no L1), starting from the clean model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lofit.heads import HeadLayout
from lofit.train.data import Encoded
from lofit.train.loop import StageHistory, optimise
from lofit.train.objective import Evaluation, Objective
from lofit.train.parameters import LofitParameters
from lofit.train.validation import Score


@dataclass
class TunedOffsets:
    """Stage-2 result: offsets ``[K, d]`` for ``heads`` (sorted), validation before/after, history."""

    heads: torch.Tensor
    offsets: torch.Tensor
    val_before: Evaluation | None
    val_after: Evaluation | None
    history: StageHistory


def tune_offsets(objective: Objective, layout: HeadLayout, heads: list[tuple[int, int]],
                 train: list[tuple[Encoded, ...]], val: list[tuple[Encoded, ...]], *, lr: float, epochs: int,
                 init_std: float, seed: int, batch_size: int, grad_accum: int, max_grad_norm: float,
                 progress: bool = True, epoch_score: Callable[[], Score] | None = None) -> TunedOffsets:
    """Train ``v ~ N(0, init_std)`` (float32 ``[K, d]``) on ``heads`` with the task loss only (Yin et al., 2024,
    §3.2); every other head's offset stays exactly zero. The DPO reference is the model at ``v``'s init.
    ``epoch_score``: keep the epoch with the best validation metric, not the last (``--select-epoch best``)."""
    torch.manual_seed(seed)
    head_index = torch.tensor(sorted(heads), dtype=torch.int64)
    init = torch.randn(len(heads), layout.head_dim) * init_std
    lofit = LofitParameters(layout, heads=head_index, offsets=init).to(objective.device)
    with lofit.attach(objective.model):
        objective.reference.clear()  # the reference policy is this stage's initial model
        objective.precompute_reference(train, batch_size)
        objective.precompute_reference(val, batch_size)
        val_before = objective.evaluate(val, batch_size) if val else None
        history = optimise(lofit.trainable(), objective, train, val, lr=lr, epochs=epochs, batch_size=batch_size,
                           grad_accum=grad_accum, max_grad_norm=max_grad_norm, seed=seed,
                           desc="stage 2: tune offsets", progress=progress, lr_flag="--lr-v",
                           epoch_score=epoch_score)
        val_after = objective.evaluate(val, batch_size) if val else None
    objective.dist.check_same(lofit.trainable())
    return TunedOffsets(head_index, lofit.offsets.detach().float().cpu(), val_before, val_after, history)
