"""Inference-Time Intervention (ITI; Li et al., NeurIPS 2023) as a LoFiT-format adapter.

For a frozen base model and a task (``--task``), each item of the task's training data gives labelled texts,
true (label 1) and false (label 0), all of one item in one group (each task module's ``probe_texts``, read
through the registry :data:`lofit.tasks.TASKS`):

- ``truthfulqa`` (train split of ``--fold``, :mod:`lofit.tasks.truthfulqa`): one text per correct and per
  incorrect answer, exactly ``"Q: {question}\\nA: {answer}"`` (the answers as written in the fold CSV,
  duplicates within a question dropped).
- ``mquake`` (``mquake/train.jsonl``): true = ``prompt_of(case) + new_answer`` (the post-edit answer), false =
  ``prompt_of(case) + answer`` (the pre-edit answer), joined with no space (the strings
  :mod:`lofit.tasks.mquake` trains on): ``"Q: Imagine that {fact} {target_new}. {question} A:{answer}"``
  (first edit, first question). A case whose two answers are equal is skipped.
- ``arc`` / ``boolq`` (the raw training rows ``lofit-train --seed S`` trains on,
  :func:`lofit.tasks.commonsense.instruct_rows` with ``S = --seed``: its seeded val rows are never seen; BoolQ
  capped at 1,000 rows): true = ``PROMPT + RESPONSE`` with the row's ``answer``, i.e. ``"...### Response:\\nthe
  correct answer is {label}"``, then one false text per other label of the instruction's
  ``"Answer format: a/b/..."``.

``--limit N`` keeps the first N items (for arc/boolq it replaces the 1,000-row cap).

1. **Activations.** Each text runs once through the model (batched, right padding + attention mask; the
   tokenizer adds BOS if it does); each head's output at the **last real token** is recorded: the input of
   ``o_proj`` split into ``[num_heads, head_dim]``.
2. **Probes.** Per head, an L2-regularised logistic regression (standardised features, full-batch L-BFGS)
   is trained on a seeded 80/20 split of the items (all texts of an item on the same side) and
   scored on the held-out 20 %. Heads are ranked by that accuracy (ties: lower ``(layer, head)`` first).
3. **Directions.** Mass-mean shift ``θ = mean(true) - mean(false)`` over all train-split activations,
   normalised; ``σ`` = standard deviation (population) of the activations projected on ``θ``.
4. **Offsets.** For each of the top-K heads, ``α · σ · θ`` (``α = 15`` by default, ITI's value).

One deliberate deviation: ITI edits only the last token at each generation step; as a LoFiT-format adapter
served by this project the offset is added at **every position** (the LoFiT convention).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lofit.adapter import LofitAdapter
from lofit.heads import (
    BaseModelIdentity,
    check_head_count,
    choose_k,
    identity_from_checkpoint,
    layout_from_config,
    o_proj_modules,
)
from lofit.hf import eval_mode, load_model, pad_token_id, seed_everything
from lofit.picture import heads_png
from lofit.tasks import PROBE_TASKS, TASKS, ProbeTexts
from lofit.train.stage1 import RANKING_KEPT, rank_heads

ITI_TASKS = PROBE_TASKS
DEFAULT_ALPHA = 15.0
VAL_FRACTION = 0.2
PROBE_L2 = 1e-3
PROBE_STEPS = 300


class BaselineError(ValueError):
    """Settings or data a baseline cannot be built from; the message says what to change."""


@dataclass
class HeadProbes:
    """Per head: held-out probe accuracy ``[L, H]``, unit direction ``θ`` ``[L, H, d]`` and ``σ`` ``[L, H]``."""

    accuracy: torch.Tensor
    directions: torch.Tensor
    sigma: torch.Tensor


def as_tensors(texts: ProbeTexts) -> tuple[torch.Tensor, torch.Tensor]:
    """``labels`` and ``groups`` of the probe texts as int64 tensors ``[N]``."""
    return torch.tensor(texts.labels, dtype=torch.int64), torch.tensor(texts.groups, dtype=torch.int64)


@torch.no_grad()
def head_activations(model: torch.nn.Module, tokenizer, texts: list[str], batch_size: int = 32,
                     progress: bool = False) -> torch.Tensor:
    """Each head's output at the last real token of each text: float32 ``[N, layers, heads, head_dim]``."""
    layout = layout_from_config(model.config)
    device = next(model.parameters()).device
    pad_id = pad_token_id(tokenizer)
    captured: dict[int, torch.Tensor] = {}
    last: torch.Tensor | None = None

    def capture(layer: int, _module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0]
        rows = torch.arange(x.shape[0], device=x.device)
        captured[layer] = x[rows, last].view(x.shape[0], layout.num_heads, layout.head_dim).float().cpu()

    handles = [proj.register_forward_pre_hook(partial(capture, layer))
               for layer, proj in enumerate(o_proj_modules(model))]
    out = []
    try:
        with eval_mode(model):
            for start in tqdm(range(0, len(texts), batch_size), desc="ITI activations", disable=not progress):
                encoded = [tokenizer(text, add_special_tokens=True)["input_ids"] for text in
                           texts[start:start + batch_size]]
                width = max(len(ids) for ids in encoded)
                ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(encoded), width), dtype=torch.long)
                for row, seq in enumerate(encoded):
                    ids[row, :len(seq)] = torch.tensor(seq)
                    mask[row, :len(seq)] = 1
                last = (mask.sum(dim=1) - 1).to(device)
                captured.clear()
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                out.append(torch.stack([captured[layer] for layer in range(layout.num_layers)], dim=1))
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(out)


def split_questions(groups: torch.Tensor, seed: int, val_fraction: float = VAL_FRACTION) -> torch.Tensor:
    """Boolean mask of the held-out rows: a seeded ``val_fraction`` of the groups (questions, cases, rows)."""
    questions = torch.unique(groups)
    if len(questions) < 2:
        raise BaselineError("ITI needs at least 2 questions (the probes hold out 20 % of them)")
    order = questions[torch.randperm(len(questions), generator=torch.Generator().manual_seed(seed))]
    held_out = order[:max(1, round(val_fraction * len(questions)))]
    return torch.isin(groups, held_out)


def probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                   l2: float = PROBE_L2, steps: int = PROBE_STEPS) -> torch.Tensor:
    """Held-out accuracy ``[G]`` of one logistic regression per group of features ``x[G, n, d]``.

    Features are standardised with the training rows' statistics; the loss is mean binary cross-entropy
    plus ``l2/2 · ||w||²`` per probe (the probes are independent, so their sum is minimised jointly).
    """
    mean, std = train_x.mean(dim=1, keepdim=True), train_x.std(dim=1, keepdim=True).clamp_min(1e-6)
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    target = train_y.to(train_x.dtype).expand(train_x.shape[0], -1)
    weight = torch.zeros(train_x.shape[0], train_x.shape[2], dtype=train_x.dtype, requires_grad=True)
    bias = torch.zeros(train_x.shape[0], 1, dtype=train_x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = torch.einsum("gnd,gd->gn", train_x, weight) + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(1)
        total = (loss + 0.5 * l2 * weight.pow(2).sum(1)).sum()
        total.backward()
        return total

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        predicted = (torch.einsum("gnd,gd->gn", val_x, weight) + bias) > 0
        return (predicted == val_y.bool()).float().mean(dim=1)


def fit_heads(activations: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, seed: int,
              l2: float = PROBE_L2, steps: int = PROBE_STEPS) -> HeadProbes:
    """Probe accuracy, mass-mean direction and its standard deviation for every head.

    ``activations``: ``[N, L, H, d]``; ``labels``: ``[N]`` (1 true, 0 false); ``groups``: ``[N]`` question ids.
    """
    if not ((labels == 1).any() and (labels == 0).any()):
        raise BaselineError("ITI needs both correct and incorrect answers")
    n, num_layers, num_heads, head_dim = activations.shape
    x = activations.float().reshape(n, num_layers * num_heads, head_dim).transpose(0, 1)  # [G, N, d]
    held_out = split_questions(groups, seed)
    accuracy = probe_accuracy(x[:, ~held_out], labels[~held_out], x[:, held_out], labels[held_out], l2, steps)
    shift = x[:, labels == 1].mean(dim=1) - x[:, labels == 0].mean(dim=1)
    directions = shift / shift.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sigma = torch.einsum("gnd,gd->gn", x, directions).std(dim=1, unbiased=False)
    return HeadProbes(accuracy=accuracy.float().reshape(num_layers, num_heads),
                      directions=directions.float().reshape(num_layers, num_heads, head_dim),
                      sigma=sigma.float().reshape(num_layers, num_heads))


def iti_offsets(probes: HeadProbes, heads: list[tuple[int, int]], alpha: float) -> torch.Tensor:
    """``α · σ · θ`` for each of ``heads``: float32 ``[K, head_dim]``."""
    index = torch.tensor(heads, dtype=torch.int64).reshape(-1, 2)
    sigma = probes.sigma[index[:, 0], index[:, 1]]
    return (alpha * sigma[:, None] * probes.directions[index[:, 0], index[:, 1]]).float()


@contextmanager
def _as_baseline_error() -> Iterator[None]:
    """The head-count checks of :mod:`lofit.heads` raise ``ValueError``; the CLI reports :class:`BaselineError`."""
    try:
        yield
    except ValueError as exc:
        raise BaselineError(str(exc)) from None


def build_iti_adapter(probes: HeadProbes, k: int, alpha: float, identity: BaseModelIdentity, name: str,
                      metadata: dict[str, Any], task: str = "truthfulqa") -> LofitAdapter:
    """The top-``k`` heads by probe accuracy with offsets ``α · σ · θ``, in the LoFiT adapter format."""
    ranking = rank_heads(probes.accuracy, keep=min(RANKING_KEPT, probes.accuracy.numel()))
    heads = sorted(ranking[:k])
    key = "{},{}".format
    selection = {"k": k, "percent_of_heads": round(100 * k / probes.accuracy.numel(), 2),
                 "head_selection": "iti-probe-accuracy", "ranking": [list(h) for h in ranking],
                 "scores": [[round(float(a), 6) for a in row] for row in probes.accuracy]}
    return LofitAdapter(
        heads=torch.tensor(heads, dtype=torch.int64), offsets=iti_offsets(probes, heads, alpha),
        base_model=identity, name=name, task=task,
        metadata={"method": "iti", "alpha": alpha, "num_heads_selected": k,
                  "probe_accuracy": {key(*h): round(float(probes.accuracy[h]), 6) for h in heads},
                  "activation_std": {key(*h): round(float(probes.sigma[h]), 6) for h in heads},
                  "selection": selection, **metadata})


def choose_alpha(model, tokenizer, probes: HeadProbes, k: int, alphas: list[float], identity: BaseModelIdentity,
                 task: str, fold: int, seed: int, limit: int | None, model_dir: str) -> tuple[float, list[dict]]:
    """The α of ``alphas`` whose adapter scores best on ``task``'s validation split (the first of equals), and
    every α's score. The metric is :class:`lofit.train.validation.ValidationScorer`'s (TruthfulQA MC1 with MC2
    for ties, MQuAKE exact match, else the validation loss of the task's training-format examples)."""
    from lofit.intervene import apply_adapters
    from lofit.tasks import load_task
    from lofit.train.config import TrainConfig
    from lofit.train.data import encode_examples
    from lofit.train.objective import Objective
    from lofit.train.validation import Score, ValidationScorer, best_index

    cfg = TrainConfig(model=model_dir, task=task, out="-", heads=k, seed=seed, limit=limit,
                      fold=fold if task == "truthfulqa" else None).resolved()
    data = load_task(task, fold=fold, seed=seed)
    val = encode_examples(tokenizer, data.val[:limit] if limit else data.val, cfg.max_prompt_len, cfg.max_len)
    objective = Objective(model, data.loss, pad_token_id(tokenizer), cfg.beta, next(model.parameters()).device)
    scorer = ValidationScorer(cfg, model, tokenizer, objective, val, False)
    results = []
    for alpha in alphas:
        adapter = build_iti_adapter(probes, k, alpha, identity, "alpha-candidate", {}, task=task)
        with apply_adapters(model, adapter, check_fingerprint=False):
            results.append({"alpha": alpha, "score": scorer.score().as_dict()})
    best = best_index([Score(**r["score"]) for r in results])
    return alphas[best], results


def make_iti_adapter(model_dir: str, out: str, *, task: str = "truthfulqa", fold: int | None = None,
                     heads: int | None = None, heads_percent: float | None = None, alpha: float = DEFAULT_ALPHA,
                     seed: int = 42, limit: int | None = None, name: str | None = None, batch_size: int = 32,
                     dtype: str = "float32", device: str = "cpu", progress: bool = True,
                     search_alpha: list[float] | None = None) -> Path:
    """The whole ``lofit-baseline iti`` run: activations, probes, directions; writes the adapter to ``out``.

    ``fold`` (default 0) is TruthfulQA's only; giving it with another task is an error. ``search_alpha``: build
    the adapter at each α, score it on the task's validation split with the metric ``lofit-train --search``
    uses (:mod:`lofit.train.validation`), keep the best α (ITI's own paper chose α on validation data too);
    the scores go into the adapter's metadata (``alpha_search``).
    """
    if task not in ITI_TASKS:
        raise BaselineError(f"ITI has no task {task!r}; its tasks are {', '.join(ITI_TASKS)}")
    if fold is not None and task != "truthfulqa":
        raise BaselineError(f"--fold is only for --task truthfulqa ({task} has no folds)")
    fold = 0 if fold is None else fold
    with _as_baseline_error():
        check_head_count(heads, heads_percent)
    if not math.isfinite(alpha) or alpha <= 0:
        raise BaselineError("--alpha must be a positive number")
    if search_alpha is not None and (not search_alpha or len(set(search_alpha)) != len(search_alpha)
                                     or not all(math.isfinite(a) and a > 0 for a in search_alpha)):
        raise BaselineError("--search-alpha needs distinct positive numbers, e.g. 1,5,10,15")
    if limit is not None and limit < 2:
        raise BaselineError("--limit must be at least 2 (the probes hold out 20 % of the questions)")
    if batch_size < 1:
        raise BaselineError("--batch-size must be at least 1")
    started = time.perf_counter()
    source = TASKS[task].probe_texts(fold=fold, limit=limit, seed=seed)
    labels, groups = as_tensors(source)
    seed_everything(seed)
    tokenizer, model = load_model(model_dir, dtype, device)
    identity = identity_from_checkpoint(model_dir, name=Path(model_dir).resolve().name)
    layout = layout_from_config(model.config)
    with _as_baseline_error():
        k = choose_k(layout.total_heads, heads, heads_percent)
    activations = head_activations(model, tokenizer, source.texts, batch_size, progress)
    captured = time.perf_counter()
    probes = fit_heads(activations, labels, groups, seed)
    name = name or Path(out).name
    truthfulqa = task == "truthfulqa"
    data = {"task": task, **source.data, "texts": len(source.texts), "true_texts": int(labels.sum()),
            "false_texts": int((labels == 0).sum()), "text_format": TASKS[task].probe_format,
            "files": source.files}
    hyperparameters = {"method": "iti", **({"fold": fold} if truthfulqa else {}), "alpha": alpha, "seed": seed,
                       "heads": heads, "heads_percent": heads_percent, "limit": limit, "val_fraction": VAL_FRACTION,
                       "probe_l2": PROBE_L2, "probe_steps": PROBE_STEPS, "batch_size": batch_size, "dtype": dtype}
    timings = {"activations": round(captured - started, 3), "probes": round(time.perf_counter() - captured, 3)}
    metadata = {**({"fold": fold} if truthfulqa else {}), "data": data, "hyperparameters": hyperparameters,
                "timings_seconds": timings}
    if search_alpha is not None:
        searched = time.perf_counter()
        alpha, results = choose_alpha(model, tokenizer, probes, k, search_alpha, identity, task, fold, seed, limit,
                                      model_dir)
        hyperparameters["alpha"] = alpha
        metadata["alpha_search"] = {"split": "validation", "metric": results[0]["score"]["metric"],
                                    "alpha": alpha, "results": results}
        timings["alpha_search"] = round(time.perf_counter() - searched, 3)
    adapter = build_iti_adapter(probes, k, alpha, identity, name, metadata, task=task)
    where = f"fold {fold}" if truthfulqa else task
    picture = heads_png(probes.accuracy, adapter.head_list(), layout.num_layers, layout.num_heads,
                        f"{name} (ITI, {where}): top {k} of {layout.total_heads} heads by probe accuracy",
                        label="held-out probe accuracy")
    return adapter.save(out, extra_files={"heads.png": picture})
