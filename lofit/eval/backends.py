"""Three ways to score a model: vLLM with the LoFiT plugin (fast, batched), the transformers reference path,
and a live transformers model as it is (the trainer's validation report).

Each answers the two questions of :class:`lofit.tasks.base.Backend` for an adapter choice (``None`` = the
base model, else a loaded adapter's name): the summed log-probability of each continuation after a prefix,
and the greedy completion of a prompt. Task scorers (:mod:`lofit.tasks`) are written against that interface
only, so a score can be checked on every path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from lofit.adapter import LofitAdapter, load_adapter
from lofit.heads import identity_from_model
from lofit.hf import eval_mode


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


class ModelBackend:
    """A transformers model scored as it is now: whoever holds it steers it (or not) around the calls.

    Only ``adapter=None`` is accepted (this backend loads no adapters). Scoring runs in eval mode (dropout
    off) and restores the model's mode afterwards.
    """

    def __init__(self, model, tokenizer, progress: bool = False, desc: str = "scoring") -> None:
        self.model, self.tokenizer, self.progress, self.desc = model, tokenizer, progress, desc

    @staticmethod
    def _no_adapter(adapter: str | None) -> None:
        if adapter is not None:
            raise ValueError(f"this backend scores the model as it is; it has no adapter {adapter!r}")

    @torch.no_grad()
    def batch_continuation_logprobs(self, items: Sequence[tuple[str, Sequence[str]]],
                                    adapter: str | None) -> list[list[float]]:
        """One :func:`prefix_continuation_logprobs` per item (nats)."""
        from tqdm.auto import tqdm

        self._no_adapter(adapter)
        with eval_mode(self.model):
            return [prefix_continuation_logprobs(self.model, self.tokenizer, prefix, continuations)
                    for prefix, continuations in tqdm(items, desc=self.desc, disable=not self.progress,
                                                      leave=False)]

    @torch.no_grad()
    def greedy(self, prompts: Sequence[str], max_new_tokens: int, adapter: str | None) -> list[str]:
        """Greedy decoding one prompt at a time (no padding: exactly the reference's greedy path)."""
        self._no_adapter(adapter)
        out = []
        with eval_mode(self.model):
            for prompt in prompts:
                ids = self.tokenizer(prompt, return_tensors="pt").input_ids.to(next(self.model.parameters()).device)
                generated = self.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                                pad_token_id=self.tokenizer.pad_token_id or 0)
                out.append(self.tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True))
        return out


class TransformersBackend:
    """The reference path: a transformers model steered with forward pre-hooks (:mod:`lofit.intervene`).

    Raises ``FileNotFoundError``/``OSError`` from transformers for a folder that is not a checkpoint, and
    :class:`lofit.adapter.AdapterError` from :meth:`load` for an adapter of another base model.
    """

    def __init__(self, model_dir: str | Path, dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        self.model.requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.base = identity_from_model(self.model, Path(model_dir).name)
        self.adapters: dict[str, LofitAdapter] = {}
        self.as_is = ModelBackend(self.model, self.tokenizer, progress=True)

    def load(self, path: str | Path) -> str:
        """Load the adapter at ``path`` (checked against this base model); returns its name."""
        adapter = load_adapter(path, expect_base=self.base)
        self.adapters[adapter.name] = adapter
        return adapter.name

    def _steer(self, adapter: str | None):
        from lofit.intervene import apply_adapters

        return apply_adapters(self.model, None if adapter is None else self.adapters[adapter])

    def batch_continuation_logprobs(self, items: Sequence[tuple[str, Sequence[str]]],
                                    adapter: str | None) -> list[list[float]]:
        """Summed continuation log-probs (nats) with ``adapter`` applied by forward pre-hooks."""
        with self._steer(adapter):
            return self.as_is.batch_continuation_logprobs(items, None)

    def greedy(self, prompts: Sequence[str], max_new_tokens: int, adapter: str | None) -> list[str]:
        """Greedy completions with ``adapter`` applied by forward pre-hooks."""
        with self._steer(adapter):
            return self.as_is.greedy(prompts, max_new_tokens, None)


class VllmBackend:
    """vLLM with the LoFiT plugin: every prompt of a batch carries its adapter choice."""

    def __init__(self, model_dir: str | Path, **engine_args) -> None:
        from lofit.vllm.offline import LofitLLM

        engine_args.setdefault("enable_prefix_caching", True)
        self.llm = LofitLLM(model_dir, **engine_args)
        self.tokenizer = self.llm.llm.get_tokenizer()

    def load(self, path: str | Path) -> str:
        """Load the adapter at ``path`` into every worker of the engine; returns its name."""
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
        """Greedy completions of all prompts in one engine call, each with ``adapter``."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
        return [o.outputs[0].text for o in self.llm.generate(list(prompts), params, adapters=adapter)]
