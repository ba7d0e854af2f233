"""Two ways to run an evaluation: vLLM with the LoFiT plugin (fast, batched), or the transformers reference path.

Both answer the same two questions for an adapter choice (``None`` = the base model, else a loaded adapter's
name): the summed log-probability of each continuation after a prefix, and the greedy completion of a
prompt. Tasks (:mod:`lofit.eval.tasks`) are written against this interface only, so a score can be checked
on both paths.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from lofit.adapter import LofitAdapter, load_adapter
from lofit.heads import identity_from_model


class Backend(Protocol):
    def load(self, path: str | Path) -> str:
        """Make the adapter at ``path`` available; returns its name."""

    def batch_continuation_logprobs(self, items: Sequence[tuple[str, Sequence[str]]],
                                    adapter: str | None) -> list[list[float]]:
        """For each ``(prefix, continuations)``: the summed log-prob of each continuation's tokens after
        ``prefix`` (prefix and continuation tokenised together)."""

    def greedy(self, prompts: Sequence[str], max_new_tokens: int, adapter: str | None) -> list[str]:
        """The greedy completion (generated text only) of each prompt."""


def split_continuations(tokenizer, prefix: str, continuations: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """Token ids of ``prefix`` (tokenised once) and of each continuation as it appears in the tokenisation of
    prefix and continuation together.

    Raises ``ValueError`` when the tokenizer merges across the boundary (then the continuation's tokens are
    not well defined).
    """
    prefix_ids = tokenizer(prefix, add_special_tokens=True)["input_ids"]
    conts = []
    for continuation in continuations:
        full = tokenizer(prefix + continuation, add_special_tokens=True)["input_ids"]
        if full[: len(prefix_ids)] != prefix_ids or len(full) == len(prefix_ids):
            raise ValueError(f"the tokenizer merges across the boundary of {prefix[-20:]!r} + "
                             f"{continuation[:20]!r}")
        conts.append(full[len(prefix_ids):])
    return prefix_ids, conts


@torch.no_grad()
def prefix_continuation_logprobs(model, tokenizer, prefix: str, continuations: Sequence[str]) -> list[float]:
    """Summed log-probs of each continuation after ``prefix``, on a transformers model as it is now.

    The shared prefix runs once; its KV cache is repeated for the batch of continuations (right-padded, so
    no attention mask is needed: no real token attends to a pad).
    """
    device = next(model.parameters()).device
    prefix_ids, conts = split_continuations(tokenizer, prefix, continuations)
    out = model(input_ids=torch.tensor([prefix_ids], device=device), use_cache=True)
    first = F.log_softmax(out.logits[0, -1].float(), dim=-1)
    width = max(len(c) for c in conts)
    ids = torch.zeros(len(conts), width, dtype=torch.long, device=device)
    for row, cont in enumerate(conts):
        ids[row, : len(cont)] = torch.tensor(cont)
    cache = out.past_key_values
    cache.batch_repeat_interleave(len(conts))
    positions = torch.arange(len(prefix_ids), len(prefix_ids) + width, device=device).expand(len(conts), -1)
    logprobs = F.log_softmax(model(input_ids=ids, past_key_values=cache, position_ids=positions,
                                   use_cache=True).logits.float(), dim=-1)
    scores = []
    for row, cont in enumerate(conts):
        total = first[cont[0]].item()
        if len(cont) > 1:
            steps = torch.tensor(cont[1:], device=device)
            total += logprobs[row, torch.arange(len(cont) - 1, device=device), steps].sum().item()
        scores.append(total)
    return scores


class TransformersBackend:
    """The reference path: a transformers model steered with forward pre-hooks (:mod:`lofit.intervene`)."""

    def __init__(self, model_dir: str | Path, dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        self.model.requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.base = identity_from_model(self.model, Path(model_dir).name)
        self.adapters: dict[str, LofitAdapter] = {}

    def load(self, path: str | Path) -> str:
        adapter = load_adapter(path, expect_base=self.base)
        self.adapters[adapter.name] = adapter
        return adapter.name

    def _steer(self, adapter: str | None):
        from lofit.intervene import apply_adapters

        return apply_adapters(self.model, None if adapter is None else self.adapters[adapter])

    @torch.no_grad()
    def batch_continuation_logprobs(self, items: Sequence[tuple[str, Sequence[str]]],
                                    adapter: str | None) -> list[list[float]]:
        from tqdm.auto import tqdm

        with self._steer(adapter):
            return [prefix_continuation_logprobs(self.model, self.tokenizer, prefix, continuations)
                    for prefix, continuations in tqdm(items, desc="scoring", leave=False)]

    @torch.no_grad()
    def greedy(self, prompts: Sequence[str], max_new_tokens: int, adapter: str | None) -> list[str]:
        out = []
        with self._steer(adapter):
            for prompt in prompts:  # one at a time: no padding, so exactly the reference's greedy path
                ids = self.tokenizer(prompt, return_tensors="pt").input_ids
                generated = self.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                                pad_token_id=self.tokenizer.pad_token_id or 0)
                out.append(self.tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True))
        return out


class VllmBackend:
    """vLLM with the LoFiT plugin: every prompt of a batch carries its adapter choice."""

    def __init__(self, model_dir: str | Path, **engine_args) -> None:
        from lofit.vllm.offline import LofitLLM

        engine_args.setdefault("enable_prefix_caching", True)
        self.llm = LofitLLM(model_dir, **engine_args)
        self.tokenizer = self.llm.llm.get_tokenizer()

    def load(self, path: str | Path) -> str:
        return self.llm.load(path)["name"]

    def batch_continuation_logprobs(self, items: Sequence[tuple[str, Sequence[str]]],
                                    adapter: str | None) -> list[list[float]]:
        """Many (prefix, continuations) at once: one engine call with prompt log-probs."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts, spans = [], []
        for prefix, continuations in items:
            prefix_ids, conts = split_continuations(self.tokenizer, prefix, continuations)
            for cont_ids in conts:
                prompts.append(TokensPrompt(prompt_token_ids=prefix_ids + cont_ids))
                spans.append((len(prefix_ids), cont_ids))
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outputs = self.llm.generate(prompts, params, adapters=adapter)
        flat = []
        for output, (start, cont_ids) in zip(outputs, spans, strict=True):
            steps = output.prompt_logprobs[start:start + len(cont_ids)]
            flat.append(sum(step[token].logprob for step, token in zip(steps, cont_ids, strict=True)))
        out, i = [], 0
        for _, continuations in items:
            out.append(flat[i:i + len(continuations)])
            i += len(continuations)
        return out

    def greedy(self, prompts: Sequence[str], max_new_tokens: int, adapter: str | None) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
        return [o.outputs[0].text for o in self.llm.generate(list(prompts), params, adapters=adapter)]
