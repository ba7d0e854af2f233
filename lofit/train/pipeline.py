"""The whole ``lofit-train`` run: load, stage 1, stage 2, evaluate, write the adapter directory.

Under ``torchrun`` / ``accelerate launch`` every rank runs this same function (:mod:`lofit.train.distributed`);
rank 0 alone writes the adapter, its picture and its report, and the others learn whether that worked."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lofit.adapter import REPORT_FILE, LofitAdapter, load_adapter
from lofit.heads import identity_from_checkpoint, layout_from_config
from lofit.hf import ModelLoadError, load_model, pad_token_id, require_checkpoint, seed_everything
from lofit.intervene import apply_adapters
from lofit.picture import heads_png
from lofit.tasks import TaskData, load_task
from lofit.train.config import ConfigError, TrainConfig
from lofit.train.data import encode_examples
from lofit.train.distributed import Distributed, launched_world_size, local_parameter_bytes, resolve_mode
from lofit.train.loop import TrainingDiverged
from lofit.train.objective import Objective
from lofit.train.search import CandidateResult, candidates, parse_grid, search_png, stage1_key
from lofit.train.stage1 import HeadSelection, random_selection, select_heads, selection_from_adapter
from lofit.train.stage2 import tune_offsets
from lofit.train.validation import Score, ValidationScorer, best_index


def _truthfulqa_mc(model, tokenizer, adapter: LofitAdapter, fold: int, limit: int | None,
                   progress: bool, known: Score | None = None) -> dict[str, Any]:
    """MC1/MC2 on the val split of ``fold``, base model then with ``adapter`` (the task's own scorer).

    ``known``: the adapter's MC1 (MC2 as its tie) on that split, already measured by ``--select-epoch best``;
    it is reported instead of scoring the adapter a second time."""
    from lofit.eval.backends import ModelBackend
    from lofit.tasks.truthfulqa import eval_items, evaluate_mc

    items = eval_items(split="val", fold=fold, limit=limit)

    def mc(desc: str) -> dict[str, Any]:
        # every rank runs the same forwards (FSDP's all-gathers need them all); only rank 0 shows progress
        result = evaluate_mc(ModelBackend(model, tokenizer, progress, desc), items, None)
        return {"mc1": result["mc1"], "mc2": result["mc2"], "questions": result["items"]}

    before = mc("MC on val, base model")
    if known is not None and known.metric == "mc1" and known.tie is not None:
        after = {"mc1": known.value, "mc2": known.tie, "questions": before["questions"]}
    else:
        with apply_adapters(model, adapter, check_fingerprint=False):  # made from this checkpoint's identity
            after = mc("MC on val, with adapter")
    return {"split": f"fold_{fold}_val", "before": before, "after": after}


def _limit(task: TaskData, limit: int | None) -> TaskData:
    if limit is not None:
        task.train, task.val = task.train[:limit], task.val[:limit]
    return task


def _decoder_layers(model) -> list:
    """The modules FSDP shards one by one: those whose classes the model lists in ``_no_split_modules`` (its
    decoder layers, and a vision tower's blocks), as accelerate's ``TRANSFORMER_BASED_WRAP`` policy picks them."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(f"--distributed fsdp: {type(model).__name__} names no layer classes in _no_split_modules "
                          "to shard")
    return layers


def _load(cfg: TrainConfig, dist: Distributed):
    """The frozen model placed for this run: on the rank's device, sharded by FSDP2, or spread by accelerate."""
    if cfg.device_map is not None:
        tokenizer, model = load_model(cfg.model, cfg.dtype, "cpu", device_map=cfg.device_map)
        device = model.get_input_embeddings().weight.device
    elif dist.mode == "fsdp":
        # The ranks of a node take turns: each reads the whole checkpoint into host memory and keeps only its
        # shard (fully_shard slices locally), so a node's host-memory peak is one model plus shards, not one
        # model per rank.
        dist.prepare_mesh()
        for turn in range(dist.local_world_size):
            if turn == dist.local_rank:
                tokenizer, model = load_model(cfg.model, cfg.dtype, "cpu")
                full_bytes = local_parameter_bytes(model)
                dist.shard_model(model, _decoder_layers(model))
            dist.barrier()
        device = dist.device
    else:
        tokenizer, model = load_model(cfg.model, cfg.dtype, dist.device)
        device = dist.device
    if dist.mode != "fsdp":
        full_bytes = local_parameter_bytes(model)
    model.config.use_cache = False  # training never reuses a KV cache
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    placement = {"mode": dist.mode, "world_size": dist.world_size, "device": str(device),
                 "device_map": None if cfg.device_map is None else
                 {k: str(v) for k, v in (getattr(model, "hf_device_map", None) or {}).items()},
                 "mixed_precision": cfg.mixed_precision, "gradient_checkpointing": cfg.gradient_checkpointing,
                 "base_parameter_bytes": full_bytes,
                 "base_parameter_bytes_per_rank": [int(b) for b in dist.gather_float(local_parameter_bytes(model))]}
    return tokenizer, model, device, placement


def _identity(model_dir: str):
    """The base model's identity from its checkpoint files; raises :class:`ModelLoadError` for broken weights."""
    from safetensors import SafetensorError

    require_checkpoint(model_dir)
    try:
        return identity_from_checkpoint(model_dir, name=Path(model_dir).resolve().name)
    except (SafetensorError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ModelLoadError(f"--model {model_dir}: cannot read the checkpoint's weights: {exc}") from exc


def _check_out(cfg: TrainConfig) -> None:
    """Fail before training, not after it, when ``--out`` cannot be written or would replace something that is
    not an adapter: a folder with other files, the model, the data (raises :class:`ConfigError`)."""
    out = Path(cfg.out)
    resolved = out.resolve()
    for flag, value in (("--model", cfg.model), ("--data", cfg.data), ("--val-data", cfg.val_data),
                        ("--heads-from", cfg.heads_from)):
        if value is not None and (resolved == Path(value).resolve() or resolved in Path(value).resolve().parents):
            raise ConfigError(f"--out {out}: would replace {flag} {value}; write the adapter somewhere else")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "adapter_config.json").is_file():
        raise ConfigError(f"--out {out}: a folder that is not an adapter directory (no adapter_config.json); "
                          "lofit-train replaces only adapters: choose a new path or empty it")
    blocker = next((p for p in resolved.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ConfigError(f"--out {out}: {blocker} is a file, not a directory")
    try:
        resolved.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(dir=resolved.parent).cleanup()
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None


def train_adapter(config: TrainConfig) -> Path | None:
    """Run both stages and write the adapter directory to ``config.out``; returns its path (``None`` on ranks
    other than 0 of a distributed run). Raises :class:`ConfigError`, :class:`~lofit.tasks.TaskError`,
    :class:`~lofit.adapter.AdapterError` for bad settings or data, and
    :class:`~lofit.train.distributed.RankFailed` on a rank whose rank 0 failed to write."""
    cfg = config.resolved()
    mode = resolve_mode(cfg.distributed)
    if cfg.device_map is not None:
        if mode != "none":
            how = f"--distributed {mode}" if cfg.distributed else f"a launcher of {launched_world_size()} processes"
            raise ConfigError(f"--device-map auto runs one process over several GPUs; it cannot be combined with "
                              f"{how} (to shard a model over ranks use --distributed fsdp alone)")
        if not torch.cuda.is_available():
            raise ConfigError("--device-map auto spreads the model over CUDA devices, and this torch sees none")
    dist = Distributed.start(mode, cfg.device)
    if not (cfg.progress and dist.is_main):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        dist.on_main(lambda: _check_out(cfg))
        return _train(cfg, dist)
    finally:
        dist.close()


def _select(cfg: TrainConfig, how: str, source: LofitAdapter | None, objective: Objective, layout, train, val,
            k: int, progress: bool) -> HeadSelection:
    """The head ranking of one run: recorded in ``--heads-from``, drawn at random, or stage 1."""
    if how == "reused":  # its length was checked against every K by _head_counts
        return selection_from_adapter(source, layout)
    if how == "random":
        return random_selection(layout, k, cfg.seed)
    seed_everything(cfg.seed)
    return select_heads(objective, layout, train, val, lr=cfg.lr_a, l1=cfg.l1, epochs=cfg.epochs_a, seed=cfg.seed,
                        batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm,
                        init_std=cfg.init_std, progress=progress)


def _point(run: TrainConfig, grid: dict[str, list]) -> dict[str, Any]:
    """The grid's settings of one candidate, as reports and messages name it."""
    return {key: getattr(run, key) for key in grid}


def _head_counts(runs: list[TrainConfig], grid: dict[str, list] | None, layout,
                 source: LofitAdapter | None) -> list[int]:
    """K of every run, each checked against the model's heads and a reused ranking's length before anything
    trains; raises :class:`ConfigError` (naming the search candidate, in a search)."""
    ranked = None if source is None else len(selection_from_adapter(source, layout).ranking)
    sizes = []
    for run in runs:
        try:
            k = run.num_heads(layout.total_heads)
            if ranked is not None and k > ranked:
                raise ConfigError(f"--heads-from {run.heads_from} ranks only {ranked} heads; K = {k} needs more")
        except ConfigError as exc:
            if grid is None:
                raise
            raise ConfigError(f"--search candidate {_point(run, grid)}: {exc}") from None
        sizes.append(k)
    return sizes


def _winner(results: list[CandidateResult]) -> int:
    """The index of the best candidate that did not diverge; raises :class:`TrainingDiverged` when all did."""
    alive = [i for i, r in enumerate(results) if "diverged" not in r.score]
    if not alive:
        raise TrainingDiverged(f"--search: every candidate diverged; nothing was written (the first: "
                               f"{results[0].settings}: {results[0].score['diverged']})")
    return alive[best_index([Score(**results[i].score) for i in alive])]


def _train(cfg: TrainConfig, dist: Distributed) -> Path | None:
    started = time.perf_counter()
    grid = parse_grid(cfg.search) if cfg.search is not None else None  # an empty grid is refused, not ignored
    runs, grid_size = candidates(cfg, grid, cfg.search_budget) if grid else ([cfg], 1)
    if grid and cfg.search_budget is not None and cfg.search_budget >= grid_size and dist.is_main:
        sys.stderr.write(f"lofit-train: note: --search-budget {cfg.search_budget} is not below the grid's size "
                         f"({grid_size}): every candidate runs\n")
    task = _limit(load_task(cfg.task, cfg.data, cfg.val_data, cfg.fold, cfg.train_size, cfg.seed, cfg.pairs),
                  cfg.limit)
    identity = _identity(cfg.model)
    source = load_adapter(cfg.heads_from, expect_base=identity) if cfg.heads_from else None  # before the model
    seed_everything(cfg.seed)
    tokenizer, model, device, placement = _load(cfg, dist)
    layout = layout_from_config(model.config)
    sizes = _head_counts(runs, grid, layout, source)  # every K checked before any training
    train = encode_examples(tokenizer, task.train, cfg.max_prompt_len, cfg.max_len)
    val = encode_examples(tokenizer, task.val, cfg.max_prompt_len, cfg.max_len)
    objective = Objective(model, task.loss, pad_token_id(tokenizer), cfg.beta, device, dist, cfg.mixed_precision)
    progress = cfg.progress and dist.is_main
    scorer = ValidationScorer(cfg, model, tokenizer, objective, val, False) \
        if grid or any(run.select_epoch == "best" for run in runs) else None
    load_seconds = time.perf_counter() - started
    how = "reused" if source is not None else "random" if cfg.random_heads else "stage1"

    selections: dict[tuple, tuple[int, HeadSelection]] = {}
    diverged: dict[tuple, TrainingDiverged] = {}  # stage-1 settings whose stage 1 diverged
    finished, results = [], []
    bar = tqdm(total=len(runs), desc="search: candidates", disable=not (progress and grid), dynamic_ncols=True)
    for run, k in zip(runs, sizes, strict=True):
        run_started = time.perf_counter()
        key = stage1_key(run, k, how)
        shared = key in selections
        objective.beta = run.beta
        try:
            if key in diverged:
                raise diverged[key]
            if not shared:
                selection = _select(run, how, source, objective, layout, train, val, k, progress and not grid)
                selections[key] = (len(selections), selection)
            stage1_index, selection = selections[key]
            seed_everything(run.seed)  # stage 2 starts afresh, as the reference's second process does
            tuned = tune_offsets(objective, layout, selection.top(k), train, val, lr=run.lr_v, epochs=run.epochs_v,
                                 init_std=run.init_std, seed=run.seed, batch_size=run.batch_size,
                                 grad_accum=run.grad_accum, max_grad_norm=run.max_grad_norm,
                                 progress=progress and not grid,
                                 epoch_score=scorer.score if run.select_epoch == "best" else None)
        except TrainingDiverged as exc:
            if not grid:
                raise
            # One candidate's settings diverged: record it and go on with the others (as a tuner marks a failed
            # trial), so that a grid that reaches too far does not lose the candidates already trained.
            if key not in selections:
                diverged[key] = exc
            reason = str(exc).removesuffix("; nothing was written")
            if dist.is_main:
                sys.stderr.write(f"lofit-train: note: search candidate {_point(run, grid)} diverged ({reason}); "
                                 "going on with the others\n")
            finished.append(None)
            heads = sorted(selections[key][1].top(k)) if key in selections else []
            results.append(CandidateResult(settings=_point(run, grid), k=k, heads=[list(h) for h in heads],
                                           score={"metric": scorer.metric, "value": None,
                                                  "higher_is_better": scorer.metric != "val_loss",
                                                  "diverged": reason},
                                           stage1_run=selections[key][0] if key in selections else None,
                                           stage1_reused=shared,
                                           seconds=round(time.perf_counter() - run_started, 3)))
            bar.update(1)
            continue
        finished.append((run, k, selection, tuned))
        if grid:
            score = tuned.history.kept_score  # --select-epoch best scored the kept epoch already
            if score is None:
                candidate = LofitAdapter(heads=tuned.heads, offsets=tuned.offsets, base_model=identity,
                                         name="candidate")
                with apply_adapters(model, candidate, check_fingerprint=False):
                    score = scorer.score()
            results.append(CandidateResult(settings=_point(run, grid), k=k, heads=tuned.heads.tolist(),
                                           score=score.as_dict(), stage1_run=stage1_index, stage1_reused=shared,
                                           seconds=round(time.perf_counter() - run_started, 3),
                                           kept_epoch=tuned.history.kept_epoch))
            bar.update(1)
            bar.set_postfix({score.metric: f"{score.value:.4f}"})
    bar.close()
    winner = _winner(results) if grid else 0
    budget = cfg.search_budget
    cfg, k, selection, tuned = finished[winner]
    reused = None if source is None else {"adapter": source.name, "task": source.task,
                                          "content_sha256": source.content_sha256}
    search = None
    if grid:
        search = {"metric": scorer.metric, "split": "validation", "grid": grid, "grid_size": grid_size,
                  "candidates": len(runs), "budget": budget, "stage1_runs": len(selections), "winner": winner,
                  "winner_settings": results[winner].settings,
                  "winner_score": results[winner].score,
                  "seconds": round(time.perf_counter() - started, 3)}

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
    hyperparameters = cfg.hyperparameters()
    if dist.active:
        hyperparameters["world_size"] = dist.world_size
    adapter = LofitAdapter(
        heads=tuned.heads, offsets=tuned.offsets, scales=scales, base_model=identity, name=name,
        task=task.name,
        metadata={"hyperparameters": hyperparameters, "data": task.identity(), "metrics": metrics,
                  **({"search": search} if search else {}),
                  "selection": {"k": k, "percent_of_heads": round(100 * k / layout.total_heads, 2),
                                "head_selection": how, "seed": cfg.seed,
                                "ranking": [list(h) for h in selection.ranking],
                                "scores": None if selection.scores is None else
                                [[round(float(x), 6) for x in row] for row in selection.scores],
                                "reused_from": reused}},
    )
    if task.name == "truthfulqa" and cfg.mc_eval:
        mc_started = time.perf_counter()
        metrics["truthfulqa_mc"] = _truthfulqa_mc(model, tokenizer, adapter, cfg.fold, cfg.limit, progress,
                                                    tuned.history.kept_score)
        metrics["truthfulqa_mc"]["seconds"] = round(time.perf_counter() - mc_started, 3)
    report = {
        "timings_seconds": {"load": round(load_seconds, 3), "stage1": round(selection.history.seconds, 3),
                            "stage2": round(tuned.history.seconds, 3),
                            "total": round(time.perf_counter() - started, 3)},
        "stage1": selection.history.as_dict(),
        "stage2": tuned.history.as_dict(),
        "metrics": metrics,
        "placement": placement,
        # the winner's own settings, and the search that chose them (``search`` is null for a plain run)
        "config": {**asdict(cfg), "search": grid, "search_budget": budget},
    }
    extra: dict[str, bytes] = {}
    if search:
        search_report = {**search, "results": [r.as_dict() for r in results]}
        extra["search_report.json"] = (json.dumps(search_report, indent=2) + "\n").encode()
        extra["search.png"] = search_png(results, winner, scorer.metric,
                                         f"{cfg.name or Path(cfg.out).name}: {len(runs)} candidates on validation "
                                         f"{scorer.metric}")

    def write() -> Path:
        title = (f"{k} of {layout.total_heads} heads drawn at random (seed {cfg.seed})" if how == "random" else
                 f"top {k} of {layout.total_heads} heads by stage-1 ||A||")
        picture = heads_png(selection.scores, heads, layout.num_layers, layout.num_heads,
                            f"{name} ({task.name}): {title}")
        try:
            return adapter.save(cfg.out, extra_files={"heads.png": picture, **extra,
                                                      REPORT_FILE: (json.dumps(report, indent=2) + "\n").encode()})
        except OSError as exc:
            raise OSError(exc.errno, f"cannot write the adapter to {cfg.out}: {exc.strerror or exc}") from exc

    return dist.on_main(write)
