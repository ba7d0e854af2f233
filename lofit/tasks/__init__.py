"""Built-in training tasks: one module each, all returning a :class:`TaskData`."""

from __future__ import annotations

from pathlib import Path

from lofit.tasks.base import PreferencePair, SFTExample, TaskData, TaskError
from lofit.tasks.clutrr import load_clutrr
from lofit.tasks.instruct import load_instruct
from lofit.tasks.jsonl import load_dpo_jsonl, load_sft_jsonl
from lofit.tasks.mquake import load_mquake
from lofit.tasks.truthfulqa import load_truthfulqa

TASKS = ("truthfulqa", "mquake", "clutrr", "arc", "boolq", "sft-jsonl", "dpo-jsonl")

__all__ = ["TASKS", "PreferencePair", "SFTExample", "TaskData", "TaskError", "load_task"]


def load_task(name: str, data: str | Path | None = None, val_data: str | Path | None = None,
              fold: int = 0, train_size: int | None = None, seed: int = 42) -> TaskData:
    """Load a built-in task by name; ``data`` is required for clutrr and the jsonl tasks."""
    if name == "truthfulqa":
        return load_truthfulqa(fold=fold, data_dir=data)
    if name == "mquake":
        return load_mquake(data_dir=data)
    if name == "clutrr":
        return load_clutrr(data_dir=data, train_size=300 if train_size is None else train_size, seed=seed)
    if name in ("arc", "boolq"):
        return load_instruct(name, data, train_size, seed)
    if name == "sft-jsonl":
        return load_sft_jsonl(data, val_data)
    if name == "dpo-jsonl":
        return load_dpo_jsonl(data, val_data)
    raise TaskError(f"unknown task {name!r}; built-in tasks are {', '.join(TASKS)}")
