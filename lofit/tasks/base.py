"""What every task module provides, and the types they share.

A task (:mod:`lofit.tasks`) is one module that holds all the knowledge about one dataset: its training data
(``lofit-train``), its evaluation items and scorer (``lofit-eval``, and the trainer's validation report), and
the labelled true/false texts its probes are fit on (``lofit-baseline iti``). :class:`Task` is the registry
entry that the three command lines read.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

PACKAGE_DATA = Path(__file__).resolve().parent.parent / "data"


class TaskError(ValueError):
    """Task data that cannot be loaded; the message names the file and what is wrong."""


@dataclass(frozen=True)
class SFTExample:
    """Completion-only SFT: the loss covers ``completion`` (plus EOS), never ``prompt``."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class PreferencePair:
    """One DPO pair; answers are joined to the prompt with no separator, as trl does."""

    prompt: str
    chosen: str
    rejected: str


@dataclass
class TaskData:
    """Training and validation examples of one task, with the identity of the files they came from."""

    name: str
    loss: Literal["sft", "dpo"]
    train: list[SFTExample] | list[PreferencePair]
    val: list[SFTExample] | list[PreferencePair]
    sources: list[dict[str, Any]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """What ``adapter_config.json`` records as the data identity."""
        return {"task": self.name, "loss": self.loss, "train_examples": len(self.train),
                "val_examples": len(self.val), "files": self.sources, **self.options}


def file_identity(path: Path, rows: int) -> dict[str, Any]:
    """Name, size, row count and sha256 of a data file."""
    data = path.read_bytes()
    return {"file": path.name, "bytes": len(data), "rows": rows, "sha256": hashlib.sha256(data).hexdigest()}


def require_file(path: Path, hint: str = "") -> Path:
    """``path`` if it is a file, else :class:`TaskError` naming it (plus ``hint``, e.g. where to get the data)."""
    if path.is_dir():
        raise TaskError(f"{path} is a directory; a data file is needed here" + (f"; {hint}" if hint else ""))
    if not path.is_file():
        raise TaskError(f"data file {path} not found" + (f"; {hint}" if hint else ""))
    return path


def read_text(path: Path) -> str:
    """The UTF-8 text of a data file; raises :class:`TaskError` naming the file when it is not UTF-8 text."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TaskError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def read_jsonl(path: Path) -> list[Any]:
    """Every non-blank line of a JSON-lines file, parsed; raises :class:`TaskError` naming the line of bad JSON."""
    rows = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise TaskError(f"{path}:{number}: invalid JSON ({exc})") from exc
    return rows


def sample(items: list, limit: int | None, seed: int) -> list:
    """A seeded random sample of ``limit`` items (all of them, in order, when ``limit`` is ``None`` or larger)."""
    return items if limit is None or limit >= len(items) else random.Random(seed).sample(items, limit)


@dataclass
class ProbeTexts:
    """Labelled texts for probing heads (ITI): one text per (item, answer).

    ``labels[i]`` is 1 for a correct answer and 0 for an incorrect one; ``groups[i]`` is the item's index, so
    a held-out split keeps every text of an item on one side. ``data`` is what the adapter's metadata says
    about where they come from (split, counts); ``files`` the identity of the files read.
    """

    texts: list[str]
    labels: list[int]
    groups: list[int]
    data: dict[str, Any] = field(default_factory=dict)
    files: list[dict[str, Any]] = field(default_factory=list)


class Backend(Protocol):
    """What a scorer needs from a model (implemented in :mod:`lofit.eval.backends`).

    ``adapter`` is ``None`` for the base model, else the name of an adapter the backend has loaded.
    """

    def batch_continuation_logprobs(self, items: Sequence[tuple[str, Sequence[str]]],
                                    adapter: str | None) -> list[list[float]]:
        """For each ``(prefix, continuations)``: the summed log-prob (nats) of each continuation's tokens."""

    def greedy(self, prompts: Sequence[str], max_new_tokens: int, adapter: str | None) -> list[str]:
        """The greedy completion (generated text only) of each prompt."""


@dataclass(frozen=True)
class EvalSpec:
    """How ``lofit-eval`` scores a task.

    ``items(data, split, fold, limit, seed)`` loads the evaluation items (raises :class:`TaskError`);
    ``score(backend, items, adapter)`` returns a dict with ``metric`` (a fraction in [0, 1]), ``items`` and any
    diagnostics. ``likelihood``: scored by log-likelihood of given continuations (else by greedy generation).
    ``second`` is an extra column of the markdown table: (key, heading).
    """

    items: Callable[..., list]
    score: Callable[[Backend, list, str | None], dict[str, Any]]
    metric: str
    likelihood: bool
    second: tuple[str, str] | None = None


@dataclass(frozen=True)
class Task:
    """One registry entry; a part a task does not have is ``None``.

    ``train(data, val_data, fold, train_size, seed)`` returns :class:`TaskData` (``lofit-train``), with the
    reference learning rates and L1 weight in ``train_defaults`` (``lofit-method.md`` §7) and the default
    ``max_len`` in tokens. ``probe_texts(fold, limit, seed)`` returns :class:`ProbeTexts` written with
    ``probe_format`` (``lofit-baseline iti``). ``folds``: the data comes in folds (``--fold``; TruthfulQA's
    2-fold protocol); ``val_data``: the training data takes a separate validation file (``--val-data``).
    """

    name: str
    folds: bool = False
    val_data: bool = False
    train: Callable[..., TaskData] | None = None
    train_defaults: dict[str, float] = field(default_factory=dict)
    max_len: int = 400
    eval: EvalSpec | None = None
    probe_texts: Callable[..., ProbeTexts] | None = None
    probe_format: str | None = None
