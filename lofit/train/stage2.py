"""Stage 2: on the selected heads only, learn offsets ``v`` (no L1), starting from the clean model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lofit.intervene import LofitHooks, dense_table
from lofit.train.data import Encoded
from lofit.train.loop import StageHistory, optimise
from lofit.train.objective import Evaluation, Objective


@dataclass
class TunedOffsets:
    """Stage-2 result: offsets ``[K, d]`` for ``heads`` (sorted), validation before/after, history."""

    heads: torch.Tensor
    offsets: torch.Tensor
    val_before: Evaluation | None
    val_after: Evaluation | None
    history: StageHistory


def tune_offsets(objective: Objective, hooks: LofitHooks, heads: list[tuple[int, int]],
                 train: list[tuple[Encoded, ...]], val: list[tuple[Encoded, ...]], *, lr: float, epochs: int,
                 init_std: float, seed: int, batch_size: int, grad_accum: int, max_grad_norm: float,
                 progress: bool = True) -> TunedOffsets:
    """Train ``v ~ N(0, init_std)`` on ``heads``; every other head's offset stays exactly zero."""
    torch.manual_seed(seed)
    head_index = torch.tensor(sorted(heads), dtype=torch.int64)
    device = next(objective.model.parameters()).device
    offsets = torch.nn.Parameter((torch.randn(len(heads), hooks.layout.head_dim) * init_std).to(device))
    index_on_device = head_index.to(device)

    def steer() -> None:
        hooks.scales = None
        hooks.offsets = dense_table(index_on_device, offsets, hooks.layout)

    steer()
    objective.reference.clear()  # the reference policy is this stage's initial model
    objective.precompute_reference(train, batch_size)
    objective.precompute_reference(val, batch_size)
    val_before = objective.evaluate(val, batch_size) if val else None
    history = optimise([offsets], objective, train, val, lr=lr, epochs=epochs, batch_size=batch_size,
                       grad_accum=grad_accum, max_grad_norm=max_grad_norm, seed=seed, steer=steer,
                       desc="stage 2: tune offsets", progress=progress)
    val_after = objective.evaluate(val, batch_size) if val else None
    hooks.offsets = None
    return TunedOffsets(head_index, offsets.detach().float().cpu(), val_before, val_after, history)
