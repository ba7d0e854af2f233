"""Instruction-format multiple-choice tasks (ARC-Challenge, BoolQ) as completion-only SFT.

The training files are LLM-Adapters' commonsense format: an instruction ending in "Answer format: ..." and
the response "the correct answer is <label>". The prompt wraps the instruction in an Alpaca-style
template; ``lofit-eval`` scores the same prompt with every candidate response (:mod:`lofit.eval.choice`).
A seeded 10 % of the training file (at most 200 items) is held out for validation.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lofit.tasks.base import PACKAGE_DATA, SFTExample, TaskData, TaskError, file_identity, require_file

PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
RESPONSE = "the correct answer is {label}"
TRAIN_FILES = {"arc": "arc/train.json", "boolq": "boolq/train.json"}
DEFAULT_TRAIN_SIZE = {"arc": None, "boolq": 1000}  # BoolQ has 9,427 rows; 1,000 keeps a CPU run short
ANSWER_FORMAT = "Answer format:"


@dataclass
class InstructRows:
    """The raw rows of a training file, split as ``lofit-train`` splits them (``train`` capped at the size)."""

    path: Path
    total: int
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]


def instruct_rows(task: str, data: str | Path | None = None, train_size: int | None = None,
                  seed: int = 42) -> InstructRows:
    """Read ``task``'s training file; hold out a seeded 10 % (at most 200) of the rows for validation."""
    if task not in TRAIN_FILES:
        raise TaskError(f"unknown instruction task {task!r}")
    path = Path(data) if data else PACKAGE_DATA / TRAIN_FILES[task]
    path = path / "train.json" if path.is_dir() else path
    try:
        rows = json.loads(require_file(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TaskError(f"{path}: not an instruction-format training file ({exc})") from exc
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"instruction", "output"} <= r.keys()
                                             for r in rows):
        raise TaskError(f"{path}: not an instruction-format training file (expected a JSON list of objects "
                        "with 'instruction' and 'output')")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    num_val = min(200, len(order) // 10)
    size = train_size if train_size is not None else DEFAULT_TRAIN_SIZE[task]
    train = [rows[i] for i in order[num_val:]]
    return InstructRows(path=path, total=len(rows), train=train[:size] if size is not None else train,
                        val=[rows[i] for i in order[:num_val]])


def answer_labels(instruction: str) -> list[str]:
    """The candidate labels of an instruction ending in ``"Answer format: a/b/c"``."""
    _, found, labels = instruction.rpartition(ANSWER_FORMAT)
    candidates = [label.strip() for label in labels.split("/")] if found else []
    if len(candidates) < 2 or not all(candidates):
        raise TaskError(f"instruction does not end in '{ANSWER_FORMAT} a/b/...': {instruction[-80:]!r}")
    return candidates


def load_instruct(task: str, data: str | Path | None = None, train_size: int | None = None,
                  seed: int = 42) -> TaskData:
    rows = instruct_rows(task, data, train_size, seed)

    def examples(part: list[dict[str, Any]]) -> list[SFTExample]:
        return [SFTExample(PROMPT.format(instruction=r["instruction"]), r["output"]) for r in part]

    return TaskData(name=task, loss="sft", train=examples(rows.train), val=examples(rows.val),
                    sources=[file_identity(rows.path, rows.total)])
