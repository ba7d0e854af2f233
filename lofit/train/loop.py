"""The optimisation loop shared by both stages: AdamW (no weight decay), linear decay without warm-up,
gradient clipping and accumulation, a validation pass per epoch, a progress bar."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from lofit.train.data import Encoded
from lofit.train.objective import Objective


@dataclass
class StageHistory:
    """What one stage did: per-step and per-epoch losses, validation results, wall time."""

    steps: list[dict[str, float]] = field(default_factory=list)
    epochs: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        """The history as ``train_report.json`` records it (seconds rounded to ms)."""
        return {"steps": self.steps, "epochs": self.epochs, "seconds": round(self.seconds, 3)}


def optimise(params: list[torch.nn.Parameter], objective: Objective, train: list[tuple[Encoded, ...]],
             val: list[tuple[Encoded, ...]], *, lr: float, epochs: int, batch_size: int, grad_accum: int,
             max_grad_norm: float, seed: int, steer: Callable[[], None],
             penalty: Callable[[], torch.Tensor] | None = None, desc: str = "train",
             progress: bool = True) -> StageHistory:
    """Train ``params`` on ``train``; ``steer()`` is called before every forward to install them."""
    history = StageHistory()
    started = time.perf_counter()
    micro_batches = math.ceil(len(train) / batch_size)
    steps_per_epoch = math.ceil(micro_batches / grad_accum)
    total_steps = steps_per_epoch * epochs
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / total_steps))
    generator = torch.Generator().manual_seed(seed)
    objective.model.train()
    bar = tqdm(total=total_steps, desc=desc, disable=not progress, dynamic_ncols=True)
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(len(train), generator=generator).tolist()
        batches = list(objective.batches(train, batch_size, order))
        epoch_losses = []
        for first in range(0, len(batches), grad_accum):
            group = batches[first:first + grad_accum]
            task_total, penalty_value = 0.0, 0.0
            for batch in group:
                steer()
                task_loss = objective.loss(batch, train)
                loss = task_loss
                if penalty is not None:
                    reg = penalty()
                    loss = loss + reg
                    penalty_value = reg.item()
                (loss / len(group)).backward()
                task_total += task_loss.item() / len(group)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm).item()
            lr_now = schedule.get_last_lr()[0]
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            record = {"step": step, "epoch": epoch + 1, "loss": task_total, "lr": lr_now,
                      "grad_norm": grad_norm}
            if penalty is not None:
                record["l1_penalty"] = penalty_value
            history.steps.append(record)
            epoch_losses.append(task_total)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{task_total:.4f}")
        steer()
        result = objective.evaluate(val, batch_size) if val else None
        summary = {"epoch": epoch + 1, "train_loss": sum(epoch_losses) / len(epoch_losses),
                   "seconds": round(time.perf_counter() - started, 3)}
        if result is not None:
            summary.update({f"val_{k}": v for k, v in result.as_dict().items()})
        history.epochs.append(summary)
    bar.close()
    history.seconds = time.perf_counter() - started
    return history
