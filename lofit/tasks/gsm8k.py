"""GSM8K (evaluation only): greedy chain-of-thought, then the last number of the answer.

Prompt ``"Question: {question}\nAnswer: Let's think step by step."``, 256 new tokens; the prediction is the
last number before any further ``"Question:"`` (thousands separators and a trailing ``.0`` dropped); the gold
answer is the number after ``"####"``. The test split ships in ``lofit/data/gsm8k``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lofit.tasks.base import PACKAGE_DATA, Backend, TaskError, read_jsonl, require_file, sample

PROMPT = "Question: {question}\nAnswer: Let's think step by step."
NEW_TOKENS = 256
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def answer_number(text: str) -> str | None:
    """The last number in ``text``, without thousands separators or a trailing ``.0``."""
    text = text.split("Question:")[0]
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    number = numbers[-1].replace(",", "")
    return number[:-2] if number.endswith(".0") else number


def gold_number(answer: str) -> str:
    """The reference number of a GSM8K answer (after ``"####"``)."""
    return answer.split("####")[-1].strip().replace(",", "")


def eval_items(data: str | Path | None = None, split: str = "test", fold: int = 0, limit: int | None = None,
               seed: int = 0) -> list[dict[str, Any]]:
    """The problems of a JSON-lines file (``data``, or its ``test.jsonl``; default the shipped test split).

    Raises :class:`TaskError` for a missing file, bad JSON, or a row without string ``question``/``answer``."""
    if data is None and split != "test":
        raise TaskError("gsm8k ships its test split only; to score another split, pass its file with --data")
    path = Path(data) if data else PACKAGE_DATA / "gsm8k" / "test.jsonl"
    path = path / "test.jsonl" if path.is_dir() else path
    rows = read_jsonl(require_file(path))
    for number, row in enumerate(rows, start=1):
        if not (isinstance(row, dict) and isinstance(row.get("question"), str) and isinstance(row.get("answer"), str)):
            raise TaskError(f"{path}: row {number} is not a GSM8K problem (string fields 'question' and 'answer')")
    return sample(rows, limit, seed)


def evaluate(backend: Backend, items: list[dict[str, Any]], adapter: str | None) -> dict[str, Any]:
    """Greedy completions of every problem: ``{"exact_match", "items", "predictions"}``."""
    completions = backend.greedy([PROMPT.format(question=item["question"]) for item in items], NEW_TOKENS, adapter)
    correct = [answer_number(c) == gold_number(item["answer"]) for c, item in zip(completions, items, strict=True)]
    return {"exact_match": sum(correct) / len(items), "items": len(items),
            "predictions": [c[:200] for c in completions]}
