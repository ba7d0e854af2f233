"""``lofit-train``: the command line over :func:`lofit.train.pipeline.train_adapter`."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from lofit.adapter import AdapterError, load_adapter
from lofit.cli_parser import OneLineParser
from lofit.heads import UnsupportedModelError
from lofit.hf import ModelLoadError
from lofit.tasks import TRAIN_TASKS, TaskError
from lofit.train.config import ConfigError, TrainConfig
from lofit.train.distributed import RankFailed


def build_parser() -> argparse.ArgumentParser:
    """``lofit-train``'s argument parser (a bad flag: one line on stderr, exit 2)."""
    p = OneLineParser(
        prog="lofit-train",
        description="Train a LoFiT adapter: stage 1 learns L1-regularised scales on every attention head and "
                    "keeps the top K by ||A||_2; stage 2 learns one offset vector per selected head. "
                    "Writes an adapter directory (adapter.safetensors, adapter_config.json, heads.png, "
                    "train_report.json). --model, --task, --out and one of --heads/--heads-percent are required "
                    "(on the command line or in --config).",
        epilog="example: lofit-train --model models/SmolLM2-135M-Instruct --task truthfulqa --fold 0 "
               "--heads-percent 3 --out adapters/truthfulqa",
    )
    p.add_argument("--config", help="JSON file of settings (keys as the long flags, with _ for -); "
                                    "flags given on the command line win")
    p.add_argument("--model", help="local Hugging Face checkpoint directory of the base model")
    p.add_argument("--task", choices=TRAIN_TASKS, help="built-in task, or sft-jsonl/dpo-jsonl with --data")
    p.add_argument("--data", help="data: FILE.jsonl for sft-jsonl (prompt, completion) and dpo-jsonl "
                                  "(prompt, chosen, rejected); the CLUTRR directory for clutrr; optional "
                                  "directory override for truthfulqa/mquake")
    p.add_argument("--val-data", help="validation FILE.jsonl for the jsonl tasks")
    p.add_argument("--out", help="adapter directory to write (replaced atomically if it exists)")
    p.add_argument("--name", help="adapter name (default: the --out directory's name)")
    p.add_argument("--heads", type=int, help="K, the number of heads to keep")
    p.add_argument("--heads-percent", type=float,
                   help="K as a percentage of all heads (3 and 10 in the paper)")
    p.add_argument("--heads-from", help="skip stage 1: take the head ranking recorded in this adapter directory "
                                        "(same base model), e.g. heads selected on another task")
    p.add_argument("--random-heads", action="store_true", default=None,
                   help="skip stage 1: tune offsets on K heads drawn uniformly at random with --seed "
                        "(the localisation ablation)")
    p.add_argument("--search", nargs="+", action="extend", metavar="KEY=V1,V2",
                   help="search a grid on the validation split and write the best candidate: keys lr_a, l1, "
                        "epochs_a, beta, init_std (these re-run stage 1), lr_v, epochs_v, heads, heads_percent "
                        "(these reuse its ranking); scored by the task's metric (TruthfulQA MC1, MQuAKE/CLUTRR "
                        "exact match, else the validation loss); writes search_report.json and search.png too")
    p.add_argument("--search-budget", type=int, help="at most N candidates: a seeded sample of a larger grid")
    p.add_argument("--pairs", choices=("first", "all"),
                   help="TruthfulQA DPO pairs per question: first incorrect answer (the paper's) or all of them "
                        "(a deviation) [first]")
    p.add_argument("--select-epoch", choices=("last", "best"),
                   help="stage 2 keeps the last epoch (the paper's) or the one with the best validation metric "
                        "(a deviation; scores every epoch) [last]")
    p.add_argument("--fold", type=int, help="TruthfulQA fold (0 or 1) [0]")
    p.add_argument("--train-size", type=int, help="subsample the training set (CLUTRR default 300)")
    p.add_argument("--seed", type=int, help="seed for torch, numpy, random and data order [42]")
    p.add_argument("--epochs", type=int, help="epochs of each stage [5]")
    p.add_argument("--epochs-a", type=int, help="epochs of stage 1 only [--epochs]")
    p.add_argument("--epochs-v", type=int, help="epochs of stage 2 only [--epochs]")
    p.add_argument("--lr-a", type=float, help="stage-1 learning rate (task default)")
    p.add_argument("--lr-v", type=float, help="stage-2 learning rate (task default)")
    p.add_argument("--l1", type=float, help="stage-1 L1 weight lambda on sum |A| (task default)")
    p.add_argument("--beta", type=float, help="DPO beta [0.5]")
    p.add_argument("--init-std", type=float, help="std of the N(0, s) init of A and v [1e-3]")
    p.add_argument("--batch-size", type=int, help="examples (or pairs) per micro-batch [8]")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimiser step [1]")
    p.add_argument("--max-grad-norm", type=float, help="gradient clipping norm [1.0]")
    p.add_argument("--max-prompt-len", type=int, help="prompt tokens kept (from the end) [128]")
    p.add_argument("--max-len", type=int, help="total tokens per sequence [512 for DPO, 400 for SFT]")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="base model dtype; LoFiT parameters "
                                                                    "stay float32 [float32]")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda [cpu]; under a launcher each rank takes "
                                    "cuda:LOCAL_RANK")
    p.add_argument("--distributed", choices=("none", "ddp", "fsdp"),
                   help="data-parallel training under torchrun / accelerate launch: ddp replicates the frozen "
                        "model on every rank, fsdp shards it (FSDP2); examples are dealt to the ranks and the "
                        "LoFiT gradients summed, so the global batch is batch-size x grad-accum x ranks "
                        "[detected: fsdp under an accelerate FSDP config, ddp under any launcher of >1 process]")
    p.add_argument("--device-map", choices=("auto",),
                   help="spread one model over this node's GPUs with accelerate (a model larger than one GPU, "
                        "single process; not with --distributed)")
    p.add_argument("--mixed-precision", choices=("no", "bf16"),
                   help="bf16 autocast for the forward; LoFiT parameters and the loss stay float32 "
                        "[accelerate launch's setting, else no]")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute each decoder layer in the backward (less activation memory for long "
                        "sequences, about one more forward of time)")
    p.add_argument("--limit", type=int, help="use only the first N train and val examples (smoke runs)")
    p.add_argument("--no-mc-eval", dest="mc_eval", action="store_false", default=None,
                   help="skip TruthfulQA MC1/MC2 on the fold's val split before/after")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bars")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config file's settings (``--config``) overridden by the flags given; raises :class:`ConfigError`
    when ``--model``, ``--task`` or ``--out`` is missing from both."""
    settings = TrainConfig.from_file(args.config) if args.config else {}
    names = {f.name for f in fields(TrainConfig)}
    settings.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    missing = [f"--{k.replace('_', '-')}" for k in ("model", "task", "out") if k not in settings]
    if missing:
        raise ConfigError(f"missing required setting(s): {', '.join(missing)}")
    return TrainConfig(**settings)


def _error(message: str) -> None:
    # one write per line: two ranks sharing a terminal do not interleave inside it
    sys.stderr.write(f"lofit-train: error: {message}\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    """Run ``lofit-train``; returns the exit status (2 with a one-line error for bad settings or data, 1 for a
    failure while running, 130 when interrupted). Under ``torchrun`` every rank runs this; rank 0 prints the
    summary."""
    args = build_parser().parse_args(argv)
    try:
        from lofit.train.pipeline import train_adapter

        out = train_adapter(config_from_args(args))
        if out is None:  # a rank other than 0: rank 0 wrote the adapter and prints the summary
            return 0
        adapter = load_adapter(out)
    except (ConfigError, TaskError, AdapterError, UnsupportedModelError, ModelLoadError, FileNotFoundError) as exc:
        _error(str(exc))
        return 2
    except (RankFailed, OSError) as exc:
        _error(str(exc))
        return 1
    except KeyboardInterrupt:
        _error("interrupted; nothing was written")
        return 130
    except RuntimeError as exc:
        if not _is_distributed_error(exc):
            raise
        _error(f"lost contact with another rank, which probably failed or was stopped (see its own message); "
               f"nothing was written ({str(exc).strip().splitlines()[0][:200]})")
        return 1
    summary = {"adapter": str(out), "heads": adapter.head_list(), "content_sha256": adapter.content_sha256,
               "metrics": adapter.metadata.get("metrics")}
    search = adapter.metadata.get("search")
    if search:  # the whole grid is in search_report.json beside the adapter
        summary["search"] = {k: search[k] for k in ("metric", "candidates", "winner", "winner_settings",
                                                    "winner_score")}
    print(json.dumps(summary, indent=2))
    return 0


def _is_distributed_error(exc: BaseException) -> bool:
    """A collective that failed because a peer went away (torch.distributed's DistError family)."""
    import torch.distributed as dist

    family = tuple(getattr(dist, name) for name in ("DistError", "DistBackendError", "DistNetworkError")
                   if hasattr(dist, name))
    text = str(exc).lower()
    return isinstance(exc, family) or "gloo" in text or "connection reset by peer" in text


if __name__ == "__main__":
    sys.exit(main())
