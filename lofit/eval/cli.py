"""``lofit-eval``: score the base model and adapters on a task, on vLLM (fast) or the transformers path.

    lofit-eval --model DIR --task NAME [--adapter DIR ...] [--split NAME] [--limit N] --out FILE.json
               [--backend auto|vllm|transformers] [--fold 0|1|both] [--data PATH] [--no-base] [--seed 0]
               [--dtype float32] [--max-model-len 1024]

Tasks: truthfulqa (MC1/MC2, ITI/LoFiT protocol), mquake and clutrr (exact match), arc, boolq, winogrande,
siqa (multiple choice by log-likelihood), gsm8k (generation + answer extraction). For TruthfulQA the base
model is scored on the test split of each fold (``--fold both``: the 2-fold protocol) and each adapter on
the test split of the fold it was trained on (from its ``adapter_config.json``). Writes JSON and a
markdown table next to it (``FILE.md``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from lofit.adapter import AdapterError, LofitAdapter, load_adapter
from lofit.cli_parser import OneLineParser
from lofit.hf import ModelLoadError
from lofit.tasks import EVAL_TASKS, TASKS, TaskError


def adapter_fold(adapter: LofitAdapter) -> int | None:
    """The TruthfulQA fold an adapter was trained on, from its recorded hyper-parameters."""
    fold = (adapter.metadata.get("hyperparameters") or {}).get("fold")
    task = TASKS.get(adapter.task or "")
    return fold if task is not None and task.folds and fold in (0, 1) else None


def make_backend(args: argparse.Namespace):
    """The backend ``--backend`` names (``auto``: transformers for log-likelihood tasks, else vLLM)."""
    from lofit.eval.backends import TransformersBackend, VllmBackend

    if args.backend == "auto":
        args.backend = "transformers" if TASKS[args.task].eval.likelihood else "vllm"
    if args.backend == "transformers":
        import torch

        return TransformersBackend(args.model, dtype=getattr(torch, args.dtype))
    from lofit.vllm.architectures import cpu_engine_defaults

    extra: dict[str, Any] = {"dtype": args.dtype, "max_model_len": args.max_model_len, "seed": args.seed,
                             **cpu_engine_defaults(default_kv_cache_gib=2)}
    return VllmBackend(args.model, **extra)


def load_items(args: argparse.Namespace, fold: int | None) -> tuple[str, list]:
    """The split name and items to score (loaded before any model, so missing data fails fast)."""
    spec = TASKS[args.task].eval
    split = args.split or "test"
    items = spec.items(data=args.data, split=split, fold=fold or 0, limit=args.limit, seed=args.seed)
    return (f"fold_{fold}_{split}" if TASKS[args.task].folds else split), items


def markdown(report: dict) -> str:
    """The report's results as a markdown table: the task's metric (and its second column) in percent."""
    spec = TASKS[report["task"]].eval
    metric = spec.metric
    second, second_heading = spec.second or (None, "")
    extra = f" | {second_heading}" if second else ""
    heading = {"mc1": "MC1", "exact_match": "exact match"}.get(metric, metric)
    lines = [f"| model | split | {heading}{extra} | items |", "|---|---|---|---|" + ("---|" if extra else "")]
    for row in report["results"]:
        value = f"{100 * row[metric]:.1f}" + (f" | {100 * row[second]:.1f}" if second else "")
        lines.append(f"| {row['label']} | {row['split']} | {value} | {row['items']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Run ``lofit-eval``; exits 2 with a one-line error for bad settings or data, writing nothing."""
    parser = OneLineParser(prog="lofit-eval", description=__doc__.replace("``", ""),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="local Hugging Face checkpoint directory")
    parser.add_argument("--task", required=True, choices=EVAL_TASKS)
    parser.add_argument("--adapter", type=Path, action="append", default=[], help="an adapter directory (repeat)")
    parser.add_argument("--split", help="data split (default: test)")
    parser.add_argument("--limit", type=int, help="score only N items (a seeded sample for the shuffled tasks)")
    parser.add_argument("--out", type=Path, required=True,
                        help="report FILE.json to write (FILE.md beside it; folders are created)")
    parser.add_argument("--backend", choices=("auto", "vllm", "transformers"), default="auto",
                        help="auto: vLLM for generation tasks, the transformers cached-prefix scorer for "
                             "log-likelihood tasks (vLLM reads no prefix cache when it returns prompt log-probs)")
    parser.add_argument("--fold", choices=("0", "1", "both"),
                        help="TruthfulQA fold(s) [both: the base model on the test split of each fold, each adapter "
                             "on the fold it was trained on]")
    parser.add_argument("--data", type=Path, help="data file or folder (required for clutrr and siqa)")
    parser.add_argument("--no-base", action="store_true", help="do not score the base model")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit sample and the engine [0]")
    parser.add_argument("--dtype", default="float32", help="model dtype, e.g. float32 or bfloat16 [float32]")
    parser.add_argument("--max-model-len", type=int, default=1024,
                        help="vLLM backend: longest prompt + completion in tokens [1024]")
    args = parser.parse_args(argv)

    def fail(message: str) -> None:
        print(f"lofit-eval: {message}", file=sys.stderr)
        raise SystemExit(2)

    if not (args.model / "config.json").is_file():
        fail(f"{args.model} is not a model directory (no config.json)")
    if args.limit is not None and args.limit < 1:
        fail("--limit must be at least 1")
    if args.no_base and not args.adapter:
        fail("--no-base needs at least one --adapter")
    adapters = []
    for path in args.adapter:
        try:
            adapters.append((path, load_adapter(path)))
        except AdapterError as exc:
            fail(str(exc))
    by_fold = TASKS[args.task].folds
    if args.fold is not None and not by_fold:
        fail(f"--fold is only for tasks with folds (truthfulqa); {args.task} has none")
    args.fold = args.fold or "both"
    folds = [0, 1] if args.fold == "both" else [int(args.fold)]
    jobs: list[tuple[str, Path | None, int | None]] = []  # (label, adapter path, fold)
    if not args.no_base:
        jobs += [("base", None, fold) for fold in (folds if by_fold else [None])]
    for path, adapter in adapters:
        fold = None
        if by_fold:
            fold = adapter_fold(adapter) if args.fold == "both" else int(args.fold)
            if fold is None:
                fail(f"{path}: cannot tell which TruthfulQA fold it was trained on; pass --fold 0 or 1")
        jobs.append((adapter.name, path, fold))

    started = time.time()
    try:
        data = {fold: load_items(args, fold) for fold in {fold for _, _, fold in jobs}}
        backend = make_backend(args)
        results = []
        for label, path, fold in jobs:
            name = backend.load(path) if path is not None else None
            t0 = time.time()
            split, items = data[fold]
            row = {"split": split, **TASKS[args.task].eval.score(backend, items, name)}
            results.append({"label": label, "adapter": None if path is None else str(path), "fold": fold,
                            **row, "seconds": round(time.time() - t0, 1)})
            metric = TASKS[args.task].eval.metric
            print(f"[eval] {args.task} {label} {row['split']}: {metric} {100 * row[metric]:.1f} "
                  f"({row['items']} items)", file=sys.stderr, flush=True)
    except (TaskError, AdapterError, ModelLoadError, FileNotFoundError) as exc:
        fail(str(exc))
    report = {"task": args.task, "model": str(args.model), "backend": args.backend, "limit": args.limit,
              "seed": args.seed, "dtype": args.dtype, "results": results,
              "seconds": round(time.time() - started, 1), "machine": platform.platform()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
