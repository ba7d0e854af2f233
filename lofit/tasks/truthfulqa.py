"""TruthfulQA with the ITI/LoFiT 2-fold split: one DPO pair per question.

Pair: prompt ``"Q: {question} A:"``, chosen = Best Answer, rejected = the *first* Incorrect Answer
(``lofit-method.md`` §8.1). The fold files ship in ``lofit/data/truthfulqa``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from lofit.tasks.base import PACKAGE_DATA, PreferencePair, TaskData, TaskError, file_identity, require_file

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class TruthfulQAItem:
    """One question with its reference answers, as in the fold CSVs."""

    question: str
    best_answer: str
    correct_answers: list[str]
    incorrect_answers: list[str]


def split_answers(field: str) -> list[str]:
    """The CSV's ``;``-separated answer list, stripped, empties dropped."""
    return [answer.strip() for answer in field.split(";") if answer.strip()]


def fold_file(fold: int, split: str, data_dir: str | Path | None = None) -> Path:
    if fold not in (0, 1):
        raise TaskError(f"TruthfulQA has folds 0 and 1, not {fold}")
    if split not in SPLITS:
        raise TaskError(f"TruthfulQA split must be one of {SPLITS}, not {split!r}")
    root = Path(data_dir) if data_dir else PACKAGE_DATA / "truthfulqa"
    return require_file(root / f"fold_{fold}_{split}_seed_42.csv")


def read_items(path: Path) -> list[TruthfulQAItem]:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    items = []
    for number, row in enumerate(rows, start=2):
        try:
            item = TruthfulQAItem(row["Question"].strip(), row["Best Answer"].strip(),
                                  split_answers(row["Correct Answers"]),
                                  split_answers(row["Incorrect Answers"]))
        except (KeyError, AttributeError) as exc:
            raise TaskError(f"{path}:{number}: missing TruthfulQA column {exc}") from exc
        if not item.question or not item.best_answer or not item.incorrect_answers:
            raise TaskError(f"{path}:{number}: question, best answer and an incorrect answer are required")
        items.append(item)
    return items


def to_pair(item: TruthfulQAItem) -> PreferencePair:
    return PreferencePair(f"Q: {item.question} A:", item.best_answer, item.incorrect_answers[0])


def load_truthfulqa(fold: int = 0, data_dir: str | Path | None = None) -> TaskData:
    paths = {split: fold_file(fold, split, data_dir) for split in ("train", "val")}
    items = {split: read_items(path) for split, path in paths.items()}
    return TaskData(
        name="truthfulqa", loss="dpo",
        train=[to_pair(item) for item in items["train"]],
        val=[to_pair(item) for item in items["val"]],
        sources=[file_identity(paths[s], len(items[s])) for s in ("train", "val")],
        options={"fold": fold},
    )
