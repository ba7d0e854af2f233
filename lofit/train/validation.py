"""The validation metric a search and ``--select-epoch best`` choose by: the task's own, on its validation split.

==============  ==========================================================  ==========
task            metric (validation split only; the test split is never read)  better
==============  ==========================================================  ==========
truthfulqa      MC1 on the fold's val questions (MC2 breaks ties)             higher
mquake          exact match of greedy answers on the val cases                higher
clutrr          exact match of greedy answers on ``--data``'s val.json         higher
others          the task loss on the validation examples (``--val-data``)      lower
==============  ==========================================================  ==========

ARC and BoolQ hold out a seeded 10 % of their training rows for validation; those rows are training-format
examples, so they are scored by their loss. Each score is of the model *as it is steered now* (LoFiT
parameters attached, or an adapter applied by the caller), in eval mode, on every rank alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lofit.tasks import TASKS
from lofit.train.config import ConfigError, TrainConfig
from lofit.train.data import Encoded
from lofit.train.objective import Objective

GENERATED = ("mquake", "clutrr")  # metric from greedy answers, on the task's own val split
LIKELIHOOD = ("truthfulqa",)  # metric from answer log-likelihoods


@dataclass
class Score:
    """One validation result: ``value`` of ``metric`` (``tie`` breaks ties, same direction)."""

    metric: str
    value: float
    higher_is_better: bool
    tie: float | None = None

    def key(self) -> tuple[float, float]:
        """A sort key where larger is better (NaN is worst)."""
        sign = 1.0 if self.higher_is_better else -1.0
        value = -math.inf if math.isnan(self.value) else sign * self.value
        tie = -math.inf if self.tie is None or math.isnan(self.tie) else sign * self.tie
        return value, tie

    def as_dict(self) -> dict:
        """What reports record."""
        return {"metric": self.metric, "value": self.value, "higher_is_better": self.higher_is_better,
                **({"tie": self.tie} if self.tie is not None else {})}


class ValidationScorer:
    """Scores the steered model on ``cfg.task``'s validation split with the task's metric (table above).

    Raises :class:`ConfigError` when the task has no validation data (a jsonl task without ``--val-data``)."""

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, tokenizer, objective: Objective,
                 val: list[tuple[Encoded, ...]], progress: bool) -> None:
        self.model, self.tokenizer, self.objective, self.val, self.progress = model, tokenizer, objective, val, progress
        self.batch_size = cfg.batch_size
        self.items = None
        spec = TASKS[cfg.task].eval
        if cfg.task in LIKELIHOOD + GENERATED:
            self.items = spec.items(data=cfg.data if cfg.task == "clutrr" else None, split="val", fold=cfg.fold or 0,
                                    limit=cfg.limit, seed=cfg.seed)
            self.spec = spec
        elif not val:
            raise ConfigError(f"choosing by validation needs validation data: {cfg.task} has none here"
                              + (" (give --val-data FILE.jsonl)" if TASKS[cfg.task].val_data else ""))

    @property
    def metric(self) -> str:
        """The metric's name."""
        return self.spec.metric if self.items is not None else "val_loss"

    @torch.no_grad()
    def score(self, desc: str = "validation") -> Score:
        """The metric of the model as it is steered now."""
        if self.items is None:
            return Score("val_loss", self.objective.evaluate(self.val, self.batch_size).loss, False)
        from lofit.eval.backends import ModelBackend

        result = self.spec.score(ModelBackend(self.model, self.tokenizer, self.progress, desc), self.items, None)
        tie = result.get(self.spec.second[0]) if self.spec.second else None
        return Score(self.spec.metric, float(result[self.spec.metric]), True,
                     None if tie is None else float(tie))


def best_index(scores: list[Score], prefer: str = "first") -> int:
    """The position of the best score; among equals the first (``prefer="first"``: search candidates) or the last
    (``"last"``: epochs, so that a metric that does not move keeps the paper's last epoch). NaN never wins."""
    if not scores:
        raise ValueError("no scores to choose from")
    order = -1 if prefer == "first" else 1
    return max(range(len(scores)), key=lambda i: (scores[i].key(), order * i))
