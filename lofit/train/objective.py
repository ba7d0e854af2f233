"""The task loss of a batch for a model steered by :class:`~lofit.train.parameters.LofitParameters`.

Losses are returned as *sums* with the count they are a sum over (scored tokens for SFT, pairs for DPO), so
that a step's loss is ``Σ sums / Σ counts`` over all of its micro-batches on all ranks, whatever their split:
gradient accumulation and data parallelism then give the same update as one big batch (the normalisation
transformers adopted for accumulation in 2024, ``num_items_in_batch``).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from lofit.hf import eval_mode
from lofit.train.data import Batch, Encoded, collate
from lofit.train.distributed import Distributed
from lofit.train.losses import dpo_losses, sequence_logprobs, token_logprobs


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
    """SFT or DPO loss on encoded examples; DPO reference log-probs are computed once per stage, up front.

    Args:
        model: the (frozen, steered) causal LM.
        loss: ``"sft"`` or ``"dpo"``.
        pad_id: the id batches are right-padded with.
        beta: DPO's β.
        device: where batches go (the device of the model's input embeddings).
        dist: this process's place in a distributed run (single-process by default).
        mixed_precision: ``"no"`` or ``"bf16"`` (forwards under ``torch.autocast`` in bfloat16; the loss and
            the LoFiT parameters stay float32).
    """

    def __init__(self, model: torch.nn.Module, loss: str, pad_id: int, beta: float, device: str | torch.device,
                 dist: Distributed | None = None, mixed_precision: str = "no") -> None:
        if loss not in ("sft", "dpo"):
            raise ValueError(f"unknown loss {loss!r}")
        if mixed_precision not in ("no", "bf16"):
            raise ValueError(f"unknown mixed precision {mixed_precision!r}")
        self.model, self.kind, self.pad_id, self.beta = model, loss, pad_id, beta
        self.device = torch.device(device)
        self.dist = dist or Distributed()
        self.mixed_precision = mixed_precision
        self.reference: dict[int, torch.Tensor] = {}  # id(encoded list) -> [N, 2] reference log-probs

    # -- batching ----------------------------------------------------------------------------------------------
    @staticmethod
    def chunks(order: list[int], batch_size: int) -> list[list[int]]:
        """``order`` cut into micro-batches of ``batch_size`` example indices (the last may be shorter)."""
        return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]

    def batch(self, encoded: list[tuple[Encoded, ...]], indices: list[int]) -> Batch:
        """The collated micro-batch of ``indices``, on the device."""
        return collate(encoded, indices, self.pad_id).to(self.device)

    def share(self, chunks: list[list[int]]) -> list[tuple[list[int], float]]:
        """This rank's ``(indices, weight)`` micro-batches out of ``chunks`` (dealt round-robin). Under FSDP every
        rank gets the same number: a rank short of one repeats ``chunks[0]`` with weight 0."""
        mine = [(c, 1.0) for c in self.dist.mine(chunks)]
        if self.dist.lockstep and chunks:
            mine += [(chunks[0], 0.0)] * (math.ceil(len(chunks) / self.dist.world_size) - len(mine))
        return mine

    def count(self, encoded: list[tuple[Encoded, ...]], indices: list[int]) -> int:
        """What the loss of ``indices`` is a sum over: scored next tokens (SFT) or pairs (DPO)."""
        if self.kind == "dpo":
            return len(indices)
        return sum(sum(encoded[i][0].mask[1:]) for i in indices)

    def autocast(self):
        """The forward's precision context: bf16 autocast when asked for, else nothing."""
        if self.mixed_precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # -- losses ------------------------------------------------------------------------------------------------
    def _logits(self, batch: Batch) -> torch.Tensor:
        with self.autocast():
            return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    def _logprobs(self, batch: Batch) -> torch.Tensor:
        return sequence_logprobs(self._logits(batch), batch.input_ids, batch.score_mask)

    @torch.no_grad()
    def precompute_reference(self, encoded: list[tuple[Encoded, ...]], batch_size: int) -> None:
        """Reference log-probs of every pair under the model as it is now (LoFiT parameters at init), each rank
        computing its share of the batches and the table summed over ranks."""
        if self.kind != "dpo":
            return
        table = torch.zeros(len(encoded), 2, dtype=torch.float32)
        with eval_mode(self.model):
            for indices, weight in self.share(self.chunks(list(range(len(encoded))), batch_size)):
                logps = self._logprobs(self.batch(encoded, indices)).float().cpu()
                if weight:
                    n = len(indices)
                    table[indices, 0], table[indices, 1] = logps[:n], logps[n:]
        self.reference[id(encoded)] = self.dist.sum_(table.to(self.dist.device)).cpu()

    def _dpo(self, batch: Batch, encoded: list[tuple[Encoded, ...]]):
        if id(encoded) not in self.reference:
            raise RuntimeError("precompute_reference() must run before the DPO loss")
        logps = self._logprobs(batch)
        n = len(batch.index)
        ref = self.reference[id(encoded)][batch.index].to(logps.device)
        chosen, rejected = logps[:n], logps[n:]
        margins = (chosen - ref[:, 0]) - (rejected - ref[:, 1])
        losses = dpo_losses(chosen, rejected, ref[:, 0], ref[:, 1], self.beta)
        return losses.sum(), margins.detach(), (chosen > rejected).detach()

    def loss_sum(self, batch: Batch, encoded: list[tuple[Encoded, ...]]) -> torch.Tensor:
        """The batch's summed task loss (a 0-d float32 tensor): cross-entropy summed over the scored tokens
        (SFT), or the DPO loss summed over the pairs; divide by :meth:`count` for the mean."""
        if self.kind == "sft":
            logps = token_logprobs(self._logits(batch), batch.input_ids)
            return -(logps * batch.score_mask[:, 1:]).sum()
        return self._dpo(batch, encoded)[0]

    def loss(self, batch: Batch, encoded: list[tuple[Encoded, ...]]) -> torch.Tensor:
        """Mean task loss of the batch (SFT: per scored token; DPO: per pair)."""
        return self.loss_sum(batch, encoded) / max(1, self.count(encoded, batch.index.tolist()))

    @torch.no_grad()
    def evaluate(self, encoded: list[tuple[Encoded, ...]], batch_size: int) -> Evaluation:
        """Mean loss (nats per scored token for SFT, per pair for DPO) and, for DPO, the two accuracies, with
        the model as it is now steered, in eval mode, over all ranks; ``nan`` loss for no examples."""
        if not encoded:
            return Evaluation(loss=math.nan)
        total, count, wins, prefs = 0.0, 0, 0, 0
        with eval_mode(self.model):
            for indices, weight in self.share(self.chunks(list(range(len(encoded))), batch_size)):
                batch = self.batch(encoded, indices)
                if self.kind == "sft":
                    loss = self.loss_sum(batch, encoded)
                else:
                    loss, margins, preferred = self._dpo(batch, encoded)
                    wins += int((margins > 0).sum()) * weight
                    prefs += int(preferred.sum()) * weight
                total += loss.item() * weight
                count += self.count(encoded, indices) * weight
        total, count, wins, prefs = self.dist.sum_floats(total, count, wins, prefs)
        if self.kind == "sft":
            return Evaluation(loss=total / max(1, count))
        return Evaluation(loss=total / count, reward_accuracy=wins / count, preference_accuracy=prefs / count)
