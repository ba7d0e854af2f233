"""The whole ``lofit-train`` run: load, stage 1, stage 2, evaluate, write the adapter directory."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lofit.adapter import REPORT_FILE, LofitAdapter, load_adapter
from lofit.heads import identity_from_checkpoint
from lofit.hf import load_model, pad_token_id, seed_everything
from lofit.intervene import LofitHooks, apply_adapters
from lofit.picture import heads_png
from lofit.tasks import TaskData, load_task
from lofit.train.config import ConfigError, TrainConfig
from lofit.train.data import encode_examples
from lofit.train.objective import Objective
from lofit.train.stage1 import random_selection, select_heads, selection_from_adapter
from lofit.train.stage2 import tune_offsets


def _truthfulqa_mc(model, tokenizer, adapter: LofitAdapter, fold: int, limit: int | None,
                   progress: bool) -> dict[str, Any]:
    """MC1/MC2 on the val split of ``fold``, base model then with ``adapter`` (the task's own scorer)."""
    from lofit.eval.backends import ModelBackend
    from lofit.tasks.truthfulqa import eval_items, evaluate_mc

    items = eval_items(split="val", fold=fold, limit=limit)

    def mc(desc: str) -> dict[str, Any]:
        result = evaluate_mc(ModelBackend(model, tokenizer, progress, desc), items, None)
        return {"mc1": result["mc1"], "mc2": result["mc2"], "questions": result["items"]}

    before = mc("MC on val, base model")
    with apply_adapters(model, adapter):
        after = mc("MC on val, with adapter")
    return {"split": f"fold_{fold}_val", "before": before, "after": after}


def _limit(task: TaskData, limit: int | None) -> TaskData:
    if limit is not None:
        task.train, task.val = task.train[:limit], task.val[:limit]
    return task


def train_adapter(config: TrainConfig) -> Path:
    """Run both stages and write the adapter directory to ``config.out``; returns its path."""
    cfg = config.resolved()
    started = time.perf_counter()
    task = _limit(load_task(cfg.task, cfg.data, cfg.val_data, cfg.fold, cfg.train_size, cfg.seed), cfg.limit)
    seed_everything(cfg.seed)
    tokenizer, model = load_model(cfg.model, cfg.dtype, cfg.device)
    identity = identity_from_checkpoint(cfg.model, name=Path(cfg.model).resolve().name)
    hooks = LofitHooks(model)
    k = cfg.num_heads(hooks.layout.total_heads)
    train = encode_examples(tokenizer, task.train, cfg.max_prompt_len, cfg.max_len)
    val = encode_examples(tokenizer, task.val, cfg.max_prompt_len, cfg.max_len)
    objective = Objective(model, task.loss, pad_token_id(tokenizer), cfg.beta, cfg.device)
    common = dict(seed=cfg.seed, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                  max_grad_norm=cfg.max_grad_norm, init_std=cfg.init_std, progress=cfg.progress)
    load_seconds = time.perf_counter() - started

    if cfg.heads_from:
        source = load_adapter(cfg.heads_from, expect_base=identity)
        selection = selection_from_adapter(source, hooks.layout)
        if k > len(selection.ranking):
            raise ConfigError(f"--heads-from {cfg.heads_from} ranks only {len(selection.ranking)} heads; "
                              f"K = {k} needs more")
        reused = {"adapter": source.name, "task": source.task, "content_sha256": source.content_sha256}
        how = "reused"
    elif cfg.random_heads:
        selection, reused, how = random_selection(hooks.layout, k, cfg.seed), None, "random"
    else:
        selection = select_heads(objective, hooks, train, val, lr=cfg.lr_a, l1=cfg.l1, epochs=cfg.epochs_a,
                                 **common)
        reused, how = None, "stage1"
    seed_everything(cfg.seed)  # stage 2 starts afresh, as the reference's second process does
    tuned = tune_offsets(objective, hooks, selection.top(k), train, val, lr=cfg.lr_v, epochs=cfg.epochs_v,
                         **common)
    hooks.remove()

    heads = [tuple(h) for h in tuned.heads.tolist()]
    # Stage-1 scales are only meaningful when this run's stage 1 produced them.
    scales = None if selection.scales is None else selection.scales[tuned.heads[:, 0], tuned.heads[:, 1]]
    name = cfg.name or Path(cfg.out).name
    metrics: dict[str, Any] = {
        "stage2_val_before": tuned.val_before.as_dict() if tuned.val_before else None,
        "stage2_val_after": tuned.val_after.as_dict() if tuned.val_after else None,
        "stage2_train_loss_first_epoch": tuned.history.epochs[0]["train_loss"],
        "stage2_train_loss_last_epoch": tuned.history.epochs[-1]["train_loss"],
    }
    adapter = LofitAdapter(
        heads=tuned.heads, offsets=tuned.offsets, scales=scales, base_model=identity, name=name,
        task=task.name,
        metadata={"hyperparameters": cfg.hyperparameters(), "data": task.identity(), "metrics": metrics,
                  "selection": {"k": k, "percent_of_heads": round(100 * k / hooks.layout.total_heads, 2),
                                "head_selection": how, "seed": cfg.seed,
                                "ranking": [list(h) for h in selection.ranking],
                                "scores": None if selection.scores is None else
                                [[round(float(x), 6) for x in row] for row in selection.scores],
                                "reused_from": reused}},
    )
    if task.name == "truthfulqa" and cfg.mc_eval:
        mc_started = time.perf_counter()
        metrics["truthfulqa_mc"] = _truthfulqa_mc(model, tokenizer, adapter, cfg.fold, cfg.limit,
                                                   cfg.progress)
        metrics["truthfulqa_mc"]["seconds"] = round(time.perf_counter() - mc_started, 3)
    report = {
        "timings_seconds": {"load": round(load_seconds, 3), "stage1": round(selection.history.seconds, 3),
                            "stage2": round(tuned.history.seconds, 3),
                            "total": round(time.perf_counter() - started, 3)},
        "stage1": selection.history.as_dict(),
        "stage2": tuned.history.as_dict(),
        "metrics": metrics,
        "config": asdict(cfg),
    }
    title = (f"{k} of {hooks.layout.total_heads} heads drawn at random (seed {cfg.seed})" if how == "random" else
             f"top {k} of {hooks.layout.total_heads} heads by stage-1 ||A||")
    picture = heads_png(selection.scores, heads, hooks.layout.num_layers, hooks.layout.num_heads,
                        f"{name} ({task.name}): {title}")
    return adapter.save(cfg.out, extra_files={"heads.png": picture,
                                              REPORT_FILE: (json.dumps(report, indent=2) + "\n").encode()})
