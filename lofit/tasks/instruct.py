"""Instruction-format multiple-choice tasks (ARC-Challenge, BoolQ) as completion-only SFT.

The training files are LLM-Adapters' commonsense format: an instruction ending in "Answer format: ..." and
the response "the correct answer is <label>". The prompt wraps the instruction in an Alpaca-style
template; ``lofit-eval`` scores the same prompt with every candidate response (:mod:`lofit.eval.choice`).
A seeded 10 % of the training file (at most 200 items) is held out for validation.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lofit.tasks.base import PACKAGE_DATA, SFTExample, TaskData, TaskError, file_identity, require_file

PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
RESPONSE = "the correct answer is {label}"
TRAIN_FILES = {"arc": "arc/train.json", "boolq": "boolq/train.json"}
DEFAULT_TRAIN_SIZE = {"arc": None, "boolq": 1000}  # BoolQ has 9,427 rows; 1,000 keeps a CPU run short


def load_instruct(task: str, data: str | Path | None = None, train_size: int | None = None,
                  seed: int = 42) -> TaskData:
    if task not in TRAIN_FILES:
        raise TaskError(f"unknown instruction task {task!r}")
    path = Path(data) if data else PACKAGE_DATA / TRAIN_FILES[task]
    path = path / "train.json" if path.is_dir() else path
    try:
        rows = json.loads(require_file(path).read_text(encoding="utf-8"))
        examples = [SFTExample(PROMPT.format(instruction=r["instruction"]), r["output"]) for r in rows]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise TaskError(f"{path}: not an instruction-format training file ({exc})") from exc
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    num_val = min(200, len(order) // 10)
    val = [examples[i] for i in order[:num_val]]
    train = [examples[i] for i in order[num_val:]]
    size = train_size if train_size is not None else DEFAULT_TRAIN_SIZE[task]
    train = train[:size] if size is not None else train
    return TaskData(name=task, loss="sft", train=train, val=val, sources=[file_identity(path, len(rows))])
