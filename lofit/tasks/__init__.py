"""The task registry: every built-in task, one module each, read by ``lofit-train``, ``lofit-eval`` and
``lofit-baseline``.

=============  =====================  ===============================  ===================
task           ``lofit-train``        ``lofit-eval`` (metric)          ``lofit-baseline iti``
=============  =====================  ===============================  ===================
truthfulqa     DPO pairs              MC1 / MC2 (log-likelihood)       probe texts
mquake         SFT                    exact match (greedy)             probe texts
clutrr         SFT (``--data``)       exact match (greedy)             --
arc, boolq     SFT                    accuracy (log-likelihood)        probe texts
winogrande     --                     accuracy (log-likelihood)        --
siqa           --                     accuracy (``--data``)            --
gsm8k          --                     exact match (greedy)             --
sft-jsonl      SFT from ``--data``    --                               --
dpo-jsonl      DPO from ``--data``    --                               --
=============  =====================  ===============================  ===================
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from lofit.tasks import clutrr, commonsense, gsm8k, jsonl, mquake, truthfulqa
from lofit.tasks.base import EvalSpec, PreferencePair, ProbeTexts, SFTExample, Task, TaskData, TaskError

# Reference learning rates and L1 weights: the Llama-2-7B rows of the official scripts (lofit-method.md §7).
_DPO_DEFAULTS = {"lr_a": 5e-3, "l1": 5e-4, "lr_v": 1e-2}
_SFT_DEFAULTS = {"lr_a": 5e-3, "l1": 1e-3, "lr_v": 1e-2}


# Each ``train`` is called as train(data=, val_data=, fold=, train_size=, seed=) with lofit-train's settings;
# these adapters pass each loader the settings it uses.
def _truthfulqa_train(data=None, val_data=None, fold=0, train_size=None, seed=42, pairs="first") -> TaskData:
    return truthfulqa.load_truthfulqa(fold, data, pairs)


def _mquake_train(data=None, val_data=None, fold=0, train_size=None, seed=42) -> TaskData:
    return mquake.load_mquake(data)


def _clutrr_train(data=None, val_data=None, fold=0, train_size=None, seed=42) -> TaskData:
    return clutrr.load_clutrr(data, 300 if train_size is None else train_size, seed)


def _sft_jsonl_train(data=None, val_data=None, fold=0, train_size=None, seed=42) -> TaskData:
    return jsonl.load_sft_jsonl(data, val_data)


def _dpo_jsonl_train(data=None, val_data=None, fold=0, train_size=None, seed=42) -> TaskData:
    return jsonl.load_dpo_jsonl(data, val_data)


def _commonsense(name: str, train: bool) -> Task:
    """ARC and BoolQ train and have probe texts; WinoGrande and SIQA are evaluated only."""

    def train_data(data=None, val_data=None, fold=0, train_size=None, seed=42) -> TaskData:
        return commonsense.load_instruct(name, data, train_size, seed)

    return Task(
        name,
        train=train_data if train else None,
        train_defaults=_SFT_DEFAULTS if train else {},  # not in the paper's scripts: MQuAKE's SFT settings
        eval=EvalSpec(partial(commonsense.eval_items, name), commonsense.evaluate, "accuracy", likelihood=True),
        probe_texts=partial(commonsense.probe_texts, name) if train else None,
        probe_format=commonsense.PROBE_FORMAT if train else None,
    )


TASKS: dict[str, Task] = {task.name: task for task in (
    Task("truthfulqa", folds=True, train=_truthfulqa_train, train_defaults=_DPO_DEFAULTS, max_len=512,
         eval=EvalSpec(truthfulqa.eval_items, truthfulqa.evaluate_mc, "mc1", likelihood=True,
                       second=("mc2", "MC2")),
         probe_texts=truthfulqa.probe_texts, probe_format=truthfulqa.PROBE_FORMAT),
    Task("mquake", train=_mquake_train, train_defaults=_SFT_DEFAULTS,
         eval=EvalSpec(mquake.eval_items, mquake.evaluate, "exact_match", likelihood=False,
                       second=("exact_match_stripped", "stripped (diagnostic)")),
         probe_texts=mquake.probe_texts, probe_format=mquake.PROBE_FORMAT),
    Task("clutrr", train=_clutrr_train, train_defaults={"lr_a": 5e-4, "l1": 5e-3, "lr_v": 1e-2},
         eval=EvalSpec(clutrr.eval_items, clutrr.evaluate, "exact_match", likelihood=False)),
    _commonsense("arc", train=True),
    _commonsense("boolq", train=True),
    _commonsense("winogrande", train=False),
    _commonsense("siqa", train=False),
    Task("gsm8k", eval=EvalSpec(gsm8k.eval_items, gsm8k.evaluate, "exact_match", likelihood=False)),
    Task("sft-jsonl", val_data=True, train=_sft_jsonl_train, train_defaults=_SFT_DEFAULTS),
    Task("dpo-jsonl", val_data=True, train=_dpo_jsonl_train, train_defaults=_DPO_DEFAULTS, max_len=512),
)}

TRAIN_TASKS = tuple(name for name, task in TASKS.items() if task.train is not None)
EVAL_TASKS = tuple(name for name, task in TASKS.items() if task.eval is not None)
PROBE_TASKS = tuple(name for name, task in TASKS.items() if task.probe_texts is not None)

__all__ = ["EVAL_TASKS", "PAIRS_TASKS", "PROBE_TASKS", "TASKS", "TRAIN_TASKS", "EvalSpec", "PreferencePair",
           "ProbeTexts", "SFTExample", "Task", "TaskData", "TaskError", "get_task", "load_task"]


def get_task(name: str, part: str | None = None) -> Task:
    """The registry entry of ``name``; with ``part`` (``"train"``, ``"eval"`` or ``"probe_texts"``) it must have
    that part. Raises :class:`TaskError` naming the tasks that do."""
    task = TASKS.get(name)
    if task is None:
        raise TaskError(f"unknown task {name!r}; built-in tasks are {', '.join(TASKS)}")
    if part is not None and getattr(task, part) is None:
        having = {"train": TRAIN_TASKS, "eval": EVAL_TASKS, "probe_texts": PROBE_TASKS}[part]
        what = {"train": "training data", "eval": "evaluation", "probe_texts": "probe texts"}[part]
        raise TaskError(f"task {name!r} has no {what}; the tasks with {what} are {', '.join(having)}")
    return task


PAIRS_TASKS = ("truthfulqa",)  # tasks with several incorrect answers per question: lofit-train --pairs all


def load_task(name: str, data: str | Path | None = None, val_data: str | Path | None = None,
              fold: int = 0, train_size: int | None = None, seed: int = 42, pairs: str = "first") -> TaskData:
    """The training data of a built-in task; ``data`` is required for clutrr and the jsonl tasks; ``pairs="all"``
    (TruthfulQA only) pairs the best answer with every incorrect one.

    Raises :class:`TaskError` for an unknown task or data that cannot be loaded.
    """
    options = {} if pairs == "first" else {"pairs": pairs}
    if options and name not in PAIRS_TASKS:
        raise TaskError(f"--pairs {pairs}: only {', '.join(PAIRS_TASKS)} has several incorrect answers to pair; "
                        f"{name}'s pairs are as its data gives them")
    return get_task(name, "train").train(data=data, val_data=val_data, fold=fold, train_size=train_size, seed=seed,
                                         **options)
