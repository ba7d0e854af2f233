"""Task losses: per-token log-probs (SFT sums them over the completion) and sigmoid DPO on summed answer log-probs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T-1]`` log-prob of each next token: position t predicts token t+1."""
    logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return logprobs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor,
                      score_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` sum of the log-probs of the scored tokens of each row."""
    return (token_logprobs(logits, input_ids) * score_mask[:, 1:]).sum(-1)


def dpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """``[N]`` per-pair ``-log sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l)))`` (Rafailov et al., 2023, eq. 7;
    trl's ``sigmoid`` loss); every input is ``[N]`` summed answer log-probs."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """The mean of :func:`dpo_losses` over the pairs."""
    return dpo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta).mean()
