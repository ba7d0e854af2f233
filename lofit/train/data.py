"""Tokenisation and batching for both losses.

A sequence is ``prompt ids + answer ids + [EOS]``; ``mask`` marks the answer tokens (and the EOS), which
are the only ones the SFT loss and the DPO log-probabilities count. The prompt is encoded with the
tokenizer's special tokens (BOS where the tokenizer adds one), the answer without.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lofit.tasks import PreferencePair, SFTExample


@dataclass(frozen=True)
class Encoded:
    """One tokenised sequence; ``mask[i]`` is True where token ``i`` is scored."""

    ids: list[int]
    mask: list[bool]


def encode(tokenizer, prompt: str, answer: str, max_prompt_len: int, max_len: int) -> Encoded:
    """Prompt (left-truncated to ``max_prompt_len``) + answer + EOS, truncated to ``max_len``."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    if len(prompt_ids) > max_prompt_len:
        keep_bos = prompt_ids[:1] if prompt_ids[0] == tokenizer.bos_token_id else []
        prompt_ids = keep_bos + prompt_ids[len(prompt_ids) - max_prompt_len + len(keep_bos):]
    answer_ids = answer_ids[: max(1, max_len - len(prompt_ids))]
    return Encoded(prompt_ids + answer_ids, [False] * len(prompt_ids) + [True] * len(answer_ids))


def encode_examples(tokenizer, examples: list[SFTExample] | list[PreferencePair], max_prompt_len: int,
                    max_len: int) -> list[tuple[Encoded, ...]]:
    """Each SFT example becomes ``(seq,)``, each preference pair ``(chosen, rejected)``."""
    out = []
    for ex in examples:
        if isinstance(ex, PreferencePair):
            out.append((encode(tokenizer, ex.prompt, ex.chosen, max_prompt_len, max_len),
                        encode(tokenizer, ex.prompt, ex.rejected, max_prompt_len, max_len)))
        else:
            out.append((encode(tokenizer, ex.prompt, ex.completion, max_prompt_len, max_len),))
    return out


@dataclass
class Batch:
    """Right-padded tensors. For DPO the rows are ``[chosen_0..chosen_n, rejected_0..rejected_n]``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    score_mask: torch.Tensor
    index: torch.Tensor  # example indices, for looking up precomputed reference log-probs

    def to(self, device: str | torch.device) -> Batch:
        """The batch with its tensors on ``device`` (``index`` stays on the host)."""
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.score_mask.to(device),
                     self.index)


def collate(encoded: list[tuple[Encoded, ...]], indices: list[int], pad_id: int) -> Batch:
    """Pad the chosen sequences of ``indices`` (then their rejected ones, for pairs) into one batch."""
    seqs = [encoded[i][part] for part in range(len(encoded[indices[0]])) for i in indices]
    width = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    scored = torch.zeros((len(seqs), width), dtype=torch.bool)
    for row, seq in enumerate(seqs):
        n = len(seq.ids)
        ids[row, :n] = torch.tensor(seq.ids)
        attention[row, :n] = 1
        scored[row, :n] = torch.tensor(seq.mask)
    return Batch(ids, attention, scored, torch.tensor(indices))
