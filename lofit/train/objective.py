"""The task loss of a batch, for a model steered through :class:`~lofit.intervene.LofitHooks`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lofit.hf import eval_mode
from lofit.train.data import Batch, Encoded, collate
from lofit.train.losses import dpo_loss, sequence_logprobs, sft_loss


@dataclass
class Evaluation:
    """Mean task loss over a data set; for DPO also how often the chosen answer wins."""

    loss: float
    reward_accuracy: float | None = None  # DPO: share of pairs whose implicit reward margin is > 0
    preference_accuracy: float | None = None  # DPO: share with log p(chosen) > log p(rejected)

    def as_dict(self) -> dict[str, float]:
        """The measured values only (DPO accuracies are absent for SFT)."""
        return {k: v for k, v in vars(self).items() if v is not None}


class Objective:
    """SFT or DPO loss on encoded examples; DPO reference log-probs are computed once, up front."""

    def __init__(self, model: torch.nn.Module, loss: str, pad_id: int, beta: float, device: str) -> None:
        if loss not in ("sft", "dpo"):
            raise ValueError(f"unknown loss {loss!r}")
        self.model, self.kind, self.pad_id, self.beta, self.device = model, loss, pad_id, beta, device
        self.reference: dict[int, torch.Tensor] = {}  # id(encoded list) -> [N, 2] reference log-probs

    def batches(self, encoded: list[tuple[Encoded, ...]], batch_size: int,
                order: list[int] | None = None):
        """Collated batches of ``batch_size`` examples in ``order`` (default: as given), on the device."""
        order = list(range(len(encoded))) if order is None else order
        for start in range(0, len(order), batch_size):
            yield collate(encoded, order[start:start + batch_size], self.pad_id).to(self.device)

    def _logprobs(self, batch: Batch) -> torch.Tensor:
        logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return sequence_logprobs(logits, batch.input_ids, batch.score_mask)

    @torch.no_grad()
    def precompute_reference(self, encoded: list[tuple[Encoded, ...]], batch_size: int) -> None:
        """Reference log-probs of every pair under the model as it is now (LoFiT parameters at init)."""
        if self.kind != "dpo":
            return
        table = torch.zeros(len(encoded), 2)
        with eval_mode(self.model):
            for batch in self.batches(encoded, batch_size):
                logps = self._logprobs(batch).float().cpu()
                n = len(batch.index)
                table[batch.index, 0], table[batch.index, 1] = logps[:n], logps[n:]
        self.reference[id(encoded)] = table

    def _dpo(self, batch: Batch, encoded: list[tuple[Encoded, ...]]):
        if id(encoded) not in self.reference:
            raise RuntimeError("precompute_reference() must run before the DPO loss")
        logps = self._logprobs(batch)
        n = len(batch.index)
        ref = self.reference[id(encoded)][batch.index].to(logps.device)
        chosen, rejected = logps[:n], logps[n:]
        margins = (chosen - ref[:, 0]) - (rejected - ref[:, 1])
        loss = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], self.beta)
        return loss, margins.detach(), (chosen > rejected).detach()

    def loss(self, batch: Batch, encoded: list[tuple[Encoded, ...]]) -> torch.Tensor:
        """Mean task loss of the batch (SFT cross-entropy or DPO)."""
        if self.kind == "sft":
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            return sft_loss(logits, batch.input_ids, batch.score_mask)
        return self._dpo(batch, encoded)[0]

    @torch.no_grad()
    def evaluate(self, encoded: list[tuple[Encoded, ...]], batch_size: int) -> Evaluation:
        """Mean loss (nats per scored token for SFT, per pair for DPO) and, for DPO, the two accuracies, with
        the model as it is now steered, in eval mode; ``nan`` loss for no examples."""
        if not encoded:
            return Evaluation(loss=math.nan)
        total, count, wins, prefs = 0.0, 0, 0, 0
        with eval_mode(self.model):
            for batch in self.batches(encoded, batch_size):
                n = len(batch.index)
                if self.kind == "sft":
                    loss = self.loss(batch, encoded)
                else:
                    loss, margins, preferred = self._dpo(batch, encoded)
                    wins += int((margins > 0).sum())
                    prefs += int(preferred.sum())
                total, count = total + loss.item() * n, count + n
        if self.kind == "sft":
            return Evaluation(loss=total / count)
        return Evaluation(loss=total / count, reward_accuracy=wins / count, preference_accuracy=prefs / count)
