"""The optimisation loop shared by both stages: AdamW (no weight decay), linear decay without warm-up,
gradient clipping and accumulation, data parallelism over ranks, a validation pass per epoch, a progress bar.

One optimiser step covers ``batch_size × grad_accum × world_size`` examples: the epoch's shuffled order is cut
into micro-batches of ``batch_size``, and each step's ``grad_accum × world_size`` micro-batches are dealt
round-robin to the ranks. Each rank back-propagates ``loss_sum / N`` for its micro-batches, where ``N`` is the
step's total count (scored tokens or pairs, known to every rank since every rank holds the data), the LoFiT
gradients are summed over ranks, then the stage-1 L1 term's gradient is added on every rank, then clipping
and AdamW. So the update is that of one process with the same global batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from lofit.train.config import ConfigError
from lofit.train.data import Encoded
from lofit.train.objective import Objective
from lofit.train.validation import Score, best_index


class TrainingDiverged(ConfigError):
    """The LoFiT parameters stopped being finite (a learning rate far too large, as a rule): a setting to change,
    reported like a bad flag."""


@dataclass
class StageHistory:
    """What one stage did: per-step and per-epoch losses, validation results, wall time."""

    steps: list[dict[str, float]] = field(default_factory=list)
    epochs: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    kept_epoch: int | None = None  # 1-based epoch whose parameters were kept (``--select-epoch best``)
    kept_score: Score | None = None  # that epoch's validation metric, so that a search need not score it again

    def as_dict(self) -> dict:
        """The history as ``train_report.json`` records it (seconds rounded to ms)."""
        out = {"steps": self.steps, "epochs": self.epochs, "seconds": round(self.seconds, 3)}
        if self.kept_epoch is not None:
            out["kept_epoch"] = self.kept_epoch
        return out


def optimise(params: list[torch.nn.Parameter], objective: Objective, train: list[tuple[Encoded, ...]],
             val: list[tuple[Encoded, ...]], *, lr: float, epochs: int, batch_size: int, grad_accum: int,
             max_grad_norm: float, seed: int, penalty: Callable[[], torch.Tensor] | None = None,
             desc: str = "train", progress: bool = True, lr_flag: str = "the learning rate",
             epoch_score: Callable[[], Score] | None = None) -> StageHistory:
    """Train ``params`` (LoFiT parameters already attached to ``objective.model``) on ``train``.

    ``penalty()`` (stage 1's ``λ·Σ|A|``) is added once per optimiser step. Returns the stage's history; the
    progress bar shows on rank 0 only. Raises :class:`TrainingDiverged` (naming ``lr_flag``) as soon as a step
    leaves a parameter that is not finite, or overflows the optimiser. With ``epoch_score`` (the validation
    metric of the model as steered at the end of an epoch) the parameters of the best epoch are kept instead of
    the last (:func:`~lofit.train.validation.best_index`); ``history.kept_epoch`` says which, and
    ``history.kept_score`` holds its metric."""
    dist = objective.dist
    history = StageHistory()
    started = time.perf_counter()
    per_step = grad_accum * (dist.world_size if dist.active else 1)
    steps_per_epoch = math.ceil(math.ceil(len(train) / batch_size) / per_step)
    total_steps = steps_per_epoch * epochs
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / total_steps))
    generator = torch.Generator().manual_seed(seed)
    objective.model.train()
    bar = tqdm(total=total_steps, desc=desc, disable=not (progress and dist.is_main), dynamic_ncols=True)
    step = 0
    scores: list[Score] = []
    kept: list[torch.Tensor] = []
    for epoch in range(epochs):
        order = torch.randperm(len(train), generator=generator).tolist()
        chunks = objective.chunks(order, batch_size)
        epoch_losses = []
        for first in range(0, len(chunks), per_step):
            group = chunks[first:first + per_step]
            step_started = time.perf_counter()
            norm = max(1, sum(objective.count(train, indices) for indices in group))
            local = 0.0
            for indices, weight in objective.share(group):
                loss_sum = objective.loss_sum(objective.batch(train, indices), train)
                ((loss_sum / norm) * weight).backward()
                local += loss_sum.item() * weight
            dist.sum_grads(params)
            task_loss = dist.sum_floats(local)[0] / norm
            record = {"step": step + 1, "epoch": epoch + 1, "loss": task_loss}
            if penalty is not None:
                reg = penalty()
                reg.backward()
                record["l1_penalty"] = reg.item()
            record["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, max_grad_norm).item()
            record["lr"] = schedule.get_last_lr()[0]
            try:
                optimizer.step()
            except RuntimeError as exc:
                if "overflow" not in str(exc):
                    raise
                raise TrainingDiverged(f"{desc}: the optimiser step overflowed at step {step + 1} ({lr_flag} {lr:g} "
                                       "is far too large); nothing was written") from None
            if not all(bool(torch.isfinite(p).all()) for p in params):
                raise TrainingDiverged(f"{desc}: the LoFiT parameters stopped being finite at step {step + 1} "
                                       f"(loss {task_loss:g}, gradient norm {record['grad_norm']:g}); lower "
                                       f"{lr_flag} (now {lr:g}); nothing was written")
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            record["seconds"] = round(time.perf_counter() - step_started, 4)
            history.steps.append(record)
            epoch_losses.append(task_loss)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{task_loss:.4f}")
        result = objective.evaluate(val, batch_size) if val else None
        summary = {"epoch": epoch + 1, "train_loss": sum(epoch_losses) / len(epoch_losses),
                   "seconds": round(time.perf_counter() - started, 3)}
        if result is not None:
            summary.update({f"val_{k}": v for k, v in result.as_dict().items()})
        if epoch_score is not None:
            scored = epoch_score()
            scores.append(scored)
            summary[f"val_metric_{scored.metric}"] = scored.value
            if best_index(scores, prefer="last") == len(scores) - 1:
                kept = [p.detach().clone() for p in params]
        history.epochs.append(summary)
    bar.close()
    if epoch_score is not None:
        history.kept_epoch = best_index(scores, prefer="last") + 1
        history.kept_score = scores[history.kept_epoch - 1]
        with torch.no_grad():
            for p, value in zip(params, kept, strict=True):
                p.copy_(value)
    history.seconds = time.perf_counter() - started
    return history
