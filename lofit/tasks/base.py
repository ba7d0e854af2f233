"""Task data types shared by every task loader."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
    if not path.is_file():
        raise TaskError(f"data file {path} not found" + (f"; {hint}" if hint else ""))
    return path
