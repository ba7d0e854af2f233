"""``lofit-baseline``: build baseline adapters in the LoFiT format (``iti``: Inference-Time Intervention)."""

from __future__ import annotations

import argparse
import json
import sys

from lofit.adapter import AdapterError, load_adapter
from lofit.baselines.iti import DEFAULT_ALPHA, ITI_TASKS, BaselineError, make_iti_adapter
from lofit.cli_parser import OneLineParser
from lofit.heads import UnsupportedModelError
from lofit.hf import ModelLoadError
from lofit.tasks import TaskError
from lofit.train.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    """``lofit-baseline``'s argument parser (one sub-command per method)."""
    p = OneLineParser(
        prog="lofit-baseline",
        description="Build a baseline adapter in the LoFiT adapter format, servable and evaluable like a "
                    "lofit-train adapter. For the random-heads ablation use lofit-train --random-heads.",
    )
    methods = p.add_subparsers(dest="method", required=True, metavar="METHOD")
    iti = methods.add_parser(
        "iti", help="Inference-Time Intervention (Li et al. 2023) on TruthfulQA, MQuAKE, ARC or BoolQ",
        description="ITI: rank heads by the held-out accuracy of a linear probe on their last-token outputs "
                    "for true vs false texts of the --task's training data (truthfulqa: train split of --fold, "
                    "'Q: {question}\\nA: {answer}'; mquake: the training prompt + new vs pre-edit answer; "
                    "arc/boolq: the training prompt + 'the correct answer is <label>' for the correct vs each "
                    "other label), keep the top K, and give each the offset alpha * sigma * theta (theta: unit "
                    "mass-mean shift true - false; sigma: std of the activations along theta). Unlike ITI, the "
                    "offset is added at every position.",
        epilog="examples: lofit-baseline iti --model models/SmolLM2-135M-Instruct --fold 0 --heads-percent 3 "
               "--out adapters/iti-truthfulqa; lofit-baseline iti --model models/SmolLM2-135M-Instruct --task arc "
               "--heads-percent 3 --out adapters/iti-arc")
    iti.add_argument("--model", help="local Hugging Face checkpoint directory of the base model (required)")
    iti.add_argument("--out", help="adapter directory to write (required; replaced atomically if it exists)")
    iti.add_argument("--name", help="adapter name (default: the --out directory's name)")
    iti.add_argument("--task", choices=ITI_TASKS, default="truthfulqa",
                     help="task whose training data gives the true/false texts [truthfulqa]")
    iti.add_argument("--fold", type=int,
                     help="TruthfulQA fold (0 or 1) whose train split is used [0]; --task truthfulqa only")
    iti.add_argument("--heads", type=int, help="K, the number of heads to intervene on")
    iti.add_argument("--heads-percent", type=float, help="K as a percentage of all heads (3 in the LoFiT paper)")
    iti.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                     help=f"intervention strength, in standard deviations along theta [{DEFAULT_ALPHA:g}]")
    iti.add_argument("--search-alpha", metavar="A1,A2,...",
                     help="choose alpha among these on the task's validation split (TruthfulQA MC1, MQuAKE exact "
                          "match, else validation loss), as lofit-train --search chooses its settings")
    iti.add_argument("--seed", type=int, default=42,
                     help="seed of the 80/20 probe split of the items; for arc/boolq also of the held-out val rows, "
                          "as lofit-train --seed [42]")
    iti.add_argument("--limit", type=int,
                     help="use only the first N train items (smoke runs; for boolq it replaces the 1000-row cap)")
    iti.add_argument("--batch-size", type=int, default=32, help="texts per forward pass [32]")
    iti.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="base model dtype [float32]")
    iti.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda [cpu]")
    iti.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``lofit-baseline``; returns the exit status (2 with a one-line error for bad settings or data)."""
    args = build_parser().parse_args(argv)
    try:
        missing = [f"--{name}" for name in ("model", "out") if getattr(args, name) is None]
        if missing:
            raise BaselineError(f"missing required setting(s): {', '.join(missing)}")
        if not args.progress:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        alphas = None
        if args.search_alpha is not None:
            try:
                alphas = [float(a) for a in args.search_alpha.split(",")]
            except ValueError:
                raise BaselineError(f"--search-alpha {args.search_alpha!r}: write numbers, e.g. 1,5,10,15") from None
        out = make_iti_adapter(args.model, args.out, task=args.task, fold=args.fold, heads=args.heads,
                               heads_percent=args.heads_percent, alpha=args.alpha, seed=args.seed,
                               limit=args.limit, name=args.name, batch_size=args.batch_size, dtype=args.dtype,
                               device=args.device, progress=args.progress, search_alpha=alphas)
        adapter = load_adapter(out)
    except (BaselineError, ConfigError, TaskError, AdapterError, UnsupportedModelError, ModelLoadError,
            FileNotFoundError) as exc:
        print(f"lofit-baseline: error: {exc}", file=sys.stderr)
        return 2
    summary = {"adapter": str(out), "method": args.method, "heads": adapter.head_list(),
               "content_sha256": adapter.content_sha256, "probe_accuracy": adapter.metadata.get("probe_accuracy"),
               **({"alpha_search": adapter.metadata["alpha_search"]} if "alpha_search" in adapter.metadata else {})}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
