"""Multiple-choice tasks in one instruction format: ARC-Challenge, BoolQ, WinoGrande, SIQA.

Every item is the instruction of LLM-Adapters' commonsense format ("Please choose the correct answer ...
Answer format: answer1/answer2/...") inside an Alpaca-style prompt, and its candidate responses are
"the correct answer is <label>". The prediction is the label whose response has the highest summed
log-probability (no length normalisation: the candidates differ in one token). Training data of the same
format (``lofit-train --task arc|boolq``) uses the same prompt, so the adapter is scored as it was trained.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from lofit.tasks.base import PACKAGE_DATA, TaskError, require_file
from lofit.tasks.instruct import PROMPT, RESPONSE


@dataclass(frozen=True)
class ChoiceItem:
    instruction: str
    labels: tuple[str, ...]  # candidate labels, e.g. ("answer1", "answer2", ...) or ("true", "false")
    answer: str  # the correct label

    @property
    def prompt(self) -> str:
        return PROMPT.format(instruction=self.instruction)

    def responses(self) -> list[str]:
        return [RESPONSE.format(label=label) for label in self.labels]


def answers_instruction(question: str, options: list[str]) -> str:
    """The ARC/SIQA instruction: numbered answers on one line, then the answer format."""
    numbered = " ".join(f"Answer{i}: {text}" for i, text in enumerate(options, start=1))
    formats = "/".join(f"answer{i}" for i in range(1, len(options) + 1))
    return f"Please choose the correct answer to the question: {question}\n\n{numbered}\n\nAnswer format: {formats}"


def boolq_instruction(question: str) -> str:
    question = question.strip()
    question = question if question.endswith("?") else question + "?"
    return f"Please answer the following question with true or false, question: {question}\n\nAnswer format: true/false"


def _jsonl(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def load_arc(path: Path) -> list[ChoiceItem]:
    items = []
    for row in _jsonl(path):
        choices = row["question"]["choices"]
        keys = [c["label"] for c in choices]
        if row["answerKey"] not in keys:
            raise TaskError(f"{path}: item {row.get('id')} has answer {row['answerKey']!r} outside {keys}")
        items.append(ChoiceItem(answers_instruction(row["question"]["stem"], [c["text"] for c in choices]),
                                tuple(f"answer{i}" for i in range(1, len(choices) + 1)),
                                f"answer{keys.index(row['answerKey']) + 1}"))
    return items


def load_boolq(path: Path) -> list[ChoiceItem]:
    items = []
    for row in _jsonl(path):
        label = row["label"]
        label = label if isinstance(label, str) else ("true" if label else "false")
        items.append(ChoiceItem(boolq_instruction(row["question"]), ("true", "false"), str(label).lower()))
    return items


def load_winogrande(path: Path) -> list[ChoiceItem]:
    rows = json.loads(path.read_text())
    return [ChoiceItem(row["instruction"], ("option1", "option2"), row["answer"]) for row in rows]


def load_siqa(path: Path) -> list[ChoiceItem]:
    items = []
    for row in _jsonl(path):
        options = row["options"]
        if row["answer"] not in options:
            raise TaskError(f"{path}: answer {row['answer']!r} is not one of the options {options}")
        question = f"{row['context']} {row['question']}"
        items.append(ChoiceItem(answers_instruction(question, options),
                                tuple(f"answer{i}" for i in range(1, len(options) + 1)),
                                f"answer{options.index(row['answer']) + 1}"))
    return items


# task -> (loader, default file under the package data or None when the data must be passed with --data)
CHOICE_TASKS = {
    "arc": (load_arc, "arc/ARC-Challenge-Test.jsonl"),
    "boolq": (load_boolq, "boolq/superglue_val.jsonl"),
    "winogrande": (load_winogrande, "winogrande/test.json"),
    "siqa": (load_siqa, None),
}


def load_choice_items(task: str, data: str | Path | None = None, limit: int | None = None,
                      seed: int = 0) -> list[ChoiceItem]:
    """The evaluation items of ``task`` (a seeded sample of ``limit`` when given)."""
    loader, default = CHOICE_TASKS[task]
    if data is None and default is None:
        raise TaskError(f"{task} is not shipped with lofit (no licence stated upstream); pass --data FILE")
    path = Path(data) if data is not None else PACKAGE_DATA / default
    if path.is_dir():
        path = path / Path(default or "dev.jsonl").name
    items = loader(require_file(path))
    if limit is not None and limit < len(items):
        items = random.Random(seed).sample(items, limit)
    return items


def choice_accuracy(scores: list[list[float]], items: list[ChoiceItem]) -> tuple[float, list[str]]:
    """Accuracy of picking each item's highest-scoring label; also the predictions."""
    predictions = [item.labels[max(range(len(s)), key=s.__getitem__)] for s, item in zip(scores, items, strict=True)]
    correct = sum(p == item.answer for p, item in zip(predictions, items, strict=True))
    return correct / len(items), predictions


def evaluate_choice(backend, items: list[ChoiceItem], adapter: str | None) -> dict:
    scores = backend.batch_continuation_logprobs([(item.prompt, item.responses()) for item in items], adapter)
    accuracy, predictions = choice_accuracy(scores, items)
    return {"accuracy": accuracy, "items": len(items), "predictions": predictions}
