"""Multiple-choice tasks in LLM-Adapters' commonsense format: ARC-Challenge, BoolQ, WinoGrande, SIQA.

Every item is an instruction ending in ``"Answer format: a/b/..."`` inside an Alpaca-style prompt
(:data:`PROMPT`); the response is ``"the correct answer is <label>"`` (:data:`RESPONSE`).

- Training (ARC and BoolQ, the files LLM-Adapters trains on): completion-only SFT of the response; a seeded
  10 % of the training file (at most 200 items) is held out for validation.
- Evaluation (all four): the prediction is the label whose response has the highest summed log-probability
  after the prompt (no length normalisation: the candidates differ in one token), so an adapter is scored
  with the prompt it was trained on; the metric is accuracy.
- Probe texts (ITI; ARC and BoolQ): the prompt + the response with the correct label (1), then with each
  other label of the instruction (0).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lofit.tasks.base import (
    PACKAGE_DATA,
    Backend,
    ProbeTexts,
    SFTExample,
    TaskData,
    TaskError,
    file_identity,
    read_jsonl,
    require_file,
    sample,
)

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
    """The SFT examples of :func:`instruct_rows`' train and val rows."""
    rows = instruct_rows(task, data, train_size, seed)

    def examples(part: list[dict[str, Any]]) -> list[SFTExample]:
        return [SFTExample(PROMPT.format(instruction=r["instruction"]), r["output"]) for r in part]

    return TaskData(name=task, loss="sft", train=examples(rows.train), val=examples(rows.val),
                    sources=[file_identity(rows.path, rows.total)])


# --- evaluation: accuracy over candidate labels -------------------------------------------------------

@dataclass(frozen=True)
class MultipleChoiceItem:
    """One evaluation item: its instruction, the candidate labels and the correct one."""

    instruction: str
    labels: tuple[str, ...]  # candidate labels, e.g. ("answer1", "answer2", ...) or ("true", "false")
    answer: str  # the correct label

    @property
    def prompt(self) -> str:
        """The instruction inside :data:`PROMPT` (the training prompt)."""
        return PROMPT.format(instruction=self.instruction)

    def responses(self) -> list[str]:
        """One :data:`RESPONSE` per candidate label, in label order."""
        return [RESPONSE.format(label=label) for label in self.labels]


def answers_instruction(question: str, options: list[str]) -> str:
    """The ARC/SIQA instruction: numbered answers on one line, then the answer format."""
    numbered = " ".join(f"Answer{i}: {text}" for i, text in enumerate(options, start=1))
    formats = "/".join(f"answer{i}" for i in range(1, len(options) + 1))
    return f"Please choose the correct answer to the question: {question}\n\n{numbered}\n\nAnswer format: {formats}"


def boolq_instruction(question: str) -> str:
    """The BoolQ instruction (a question mark added when missing)."""
    question = question.strip()
    question = question if question.endswith("?") else question + "?"
    return f"Please answer the following question with true or false, question: {question}\n\nAnswer format: true/false"


def load_arc(path: Path) -> list[MultipleChoiceItem]:
    """ARC-Challenge items from its JSON-lines release (``question.stem``, ``question.choices``, ``answerKey``)."""
    items = []
    for row in read_jsonl(path):
        choices = row["question"]["choices"]
        keys = [c["label"] for c in choices]
        if row["answerKey"] not in keys:
            raise TaskError(f"{path}: item {row.get('id')} has answer {row['answerKey']!r} outside {keys}")
        items.append(MultipleChoiceItem(answers_instruction(row["question"]["stem"], [c["text"] for c in choices]),
                                        tuple(f"answer{i}" for i in range(1, len(choices) + 1)),
                                        f"answer{keys.index(row['answerKey']) + 1}"))
    return items


def load_boolq(path: Path) -> list[MultipleChoiceItem]:
    """BoolQ items from SuperGLUE's JSON-lines release (``question``, ``label``)."""
    items = []
    for row in read_jsonl(path):
        label = row["label"]
        label = label if isinstance(label, str) else ("true" if label else "false")
        items.append(MultipleChoiceItem(boolq_instruction(row["question"]), ("true", "false"), str(label).lower()))
    return items


def load_winogrande(path: Path) -> list[MultipleChoiceItem]:
    """WinoGrande items from LLM-Adapters' JSON file (``instruction``, ``answer`` = option1/option2)."""
    rows = json.loads(path.read_text())
    return [MultipleChoiceItem(row["instruction"], ("option1", "option2"), row["answer"]) for row in rows]


def load_siqa(path: Path) -> list[MultipleChoiceItem]:
    """SIQA items from a JSON-lines file (``context``, ``question``, ``options``, ``answer``)."""
    items = []
    for row in read_jsonl(path):
        options = row["options"]
        if row["answer"] not in options:
            raise TaskError(f"{path}: answer {row['answer']!r} is not one of the options {options}")
        question = f"{row['context']} {row['question']}"
        items.append(MultipleChoiceItem(answers_instruction(question, options),
                                        tuple(f"answer{i}" for i in range(1, len(options) + 1)),
                                        f"answer{options.index(row['answer']) + 1}"))
    return items


# task -> (loader, default file under the package data or None when the data must be passed with --data)
EVAL_FILES = {
    "arc": (load_arc, "arc/ARC-Challenge-Test.jsonl"),
    "boolq": (load_boolq, "boolq/superglue_val.jsonl"),
    "winogrande": (load_winogrande, "winogrande/test.json"),
    "siqa": (load_siqa, None),
}


def eval_items(task: str, data: str | Path | None = None, split: str = "test", fold: int = 0,
               limit: int | None = None, seed: int = 0) -> list[MultipleChoiceItem]:
    """The evaluation items of ``task`` (a seeded sample of ``limit`` when given). Each task ships one evaluation
    file, its split ``test``; another ``split`` needs ``data`` (the split is then only the report's label).
    Raises :class:`TaskError` for a missing or malformed file."""
    loader, default = EVAL_FILES[task]
    if data is None and default is None:
        raise TaskError(f"{task} is not shipped with lofit (no licence stated upstream); pass --data FILE")
    if data is None and split != "test":
        raise TaskError(f"{task} ships one evaluation file ({default}), scored as split 'test'; to score another "
                        "split, pass its file with --data")
    path = Path(data) if data is not None else PACKAGE_DATA / default
    if path.is_dir():
        path = path / Path(default or "dev.jsonl").name
    try:
        items = loader(require_file(path))
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as exc:
        if isinstance(exc, TaskError):
            raise
        raise TaskError(f"{path}: not a {task} evaluation file ({type(exc).__name__}: {exc})") from None
    return sample(items, limit, seed)


def accuracy(scores: list[list[float]], items: list[MultipleChoiceItem]) -> tuple[float, list[str]]:
    """Accuracy (a fraction) of picking each item's highest-scoring label; also the predicted labels."""
    predictions = [item.labels[max(range(len(s)), key=s.__getitem__)] for s, item in zip(scores, items, strict=True)]
    correct = sum(p == item.answer for p, item in zip(predictions, items, strict=True))
    return correct / len(items), predictions


def evaluate(backend: Backend, items: list[MultipleChoiceItem], adapter: str | None) -> dict[str, Any]:
    """Log-likelihood of every candidate response: ``{"accuracy", "items", "predictions"}``."""
    scores = backend.batch_continuation_logprobs([(item.prompt, item.responses()) for item in items], adapter)
    value, predictions = accuracy(scores, items)
    return {"accuracy": value, "items": len(items), "predictions": predictions}


# --- probe texts (ITI) --------------------------------------------------------------------------------

PROBE_FORMAT = PROMPT + RESPONSE


def instruct_texts(rows: list[dict[str, Any]]) -> ProbeTexts:
    """Per row: ``PROMPT + RESPONSE`` with the correct label (label 1), then with each other label (label 0)."""
    texts, labels, groups = [], [], []
    for index, row in enumerate(rows):
        candidates = answer_labels(row["instruction"])
        correct = row.get("answer")
        if correct not in candidates:
            raise TaskError(f"training row {index}: answer {correct!r} is not one of the labels {candidates}")
        prompt = PROMPT.format(instruction=row["instruction"])
        for label in [correct, *(c for c in candidates if c != correct)]:
            texts.append(prompt + RESPONSE.format(label=label))
            labels.append(int(label == correct))
            groups.append(index)
    return ProbeTexts(texts, labels, groups)


def probe_texts(task: str, fold: int = 0, limit: int | None = None, seed: int = 42) -> ProbeTexts:
    """The probe texts of the rows ``lofit-train --seed SEED`` trains on (``limit`` replaces the size cap)."""
    rows = instruct_rows(task, train_size=limit, seed=seed)
    texts = instruct_texts(rows.train)
    texts.data = {"split": "train", "items": len(rows.train), "held_out_val_rows": len(rows.val), "split_seed": seed}
    texts.files = [file_identity(rows.path, rows.total)]
    return texts
