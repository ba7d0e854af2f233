"""Training configuration: every hyper-parameter of both stages, with the reference defaults."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from lofit.heads import check_head_count, choose_k
from lofit.tasks import PAIRS_TASKS, TASKS, TRAIN_TASKS


class ConfigError(ValueError):
    """An invalid training configuration."""


def check_device(device: str) -> None:
    """Raise :class:`ConfigError` unless ``device`` is ``cpu``, ``cuda`` or ``cuda:N``."""
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and not (kind == "cuda" and index.isdigit())):
        raise ConfigError(f"--device {device!r}: lofit-train runs on cpu, cuda or cuda:N")


def _searches_k(search: list[str] | dict[str, Any] | None) -> bool:
    """Whether a ``--search`` grid (flags or a config file's object, not yet parsed) varies K."""
    if not search:
        return False
    keys = search if isinstance(search, dict) else [str(s).partition("=")[0] for s in search]
    return bool({str(k).strip().replace("-", "_") for k in keys} & {"heads", "heads_percent"})


@dataclass
class TrainConfig:
    """All settings of a ``lofit-train`` run. ``None`` learning rates/L1 take the task's defaults
    (:attr:`lofit.tasks.Task.train_defaults`)."""

    model: str
    task: str
    out: str
    data: str | None = None
    val_data: str | None = None
    name: str | None = None
    fold: int | None = None  # TruthfulQA only; 0 when not given
    train_size: int | None = None
    heads: int | None = None
    heads_percent: float | None = None
    heads_from: str | None = None
    random_heads: bool = False
    seed: int = 42
    epochs: int = 5
    epochs_a: int | None = None
    epochs_v: int | None = None
    lr_a: float | None = None
    lr_v: float | None = None
    l1: float | None = None
    beta: float = 0.5
    init_std: float = 1e-3
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    max_prompt_len: int = 128
    max_len: int | None = None
    dtype: str = "float32"
    device: str = "cpu"
    distributed: str | None = None  # none | ddp | fsdp; None: detected from the launcher's environment
    device_map: str | None = None  # "auto": spread one model over this node's GPUs (transformers/accelerate)
    mixed_precision: str | None = None  # no | bf16; None: accelerate launch's setting, else no
    gradient_checkpointing: bool = False
    pairs: str = "first"  # DPO pairs per TruthfulQA question: first (the paper's) or all (a deviation)
    select_epoch: str = "last"  # stage-2 epoch kept: last (the paper's) or best (on the validation metric)
    search: dict[str, list] | None = None  # a grid of settings to search on the validation split
    search_budget: int | None = None  # at most this many candidates (a seeded sample of the grid)
    limit: int | None = None
    mc_eval: bool = True
    progress: bool = True

    def resolved(self) -> TrainConfig:
        """Fill task defaults and check every value; raises :class:`ConfigError`."""
        if self.task not in TRAIN_TASKS:
            raise ConfigError(f"unknown task {self.task!r}; choose one of {', '.join(TRAIN_TASKS)}")
        task = TASKS[self.task]
        out = replace(self, **{k: v for k, v in task.train_defaults.items() if getattr(self, k) is None})
        if out.max_len is None:
            out.max_len = task.max_len
        if out.epochs_a is None:
            out.epochs_a = out.epochs
        if out.epochs_v is None:
            out.epochs_v = out.epochs
        try:
            check_head_count(out.heads, out.heads_percent)
        except ValueError as exc:
            # a search whose grid gives K (heads or heads_percent) needs no K of its own
            if out.heads is not None or out.heads_percent is not None or not _searches_k(out.search):
                raise ConfigError(str(exc)) from None
        if out.random_heads and out.heads_from:
            raise ConfigError("--random-heads and --heads-from both choose the heads; give at most one")
        if out.dtype not in ("float32", "bfloat16"):
            raise ConfigError("--dtype must be float32 or bfloat16")
        if out.mixed_precision is None:
            launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
            if launcher not in ("no", "bf16"):
                raise ConfigError(f"accelerate's mixed_precision {launcher!r} is not supported: use bf16 or no "
                                  "(LoFiT parameters always train in float32)")
            out.mixed_precision = launcher
        if out.mixed_precision not in ("no", "bf16"):
            raise ConfigError("--mixed-precision must be no or bf16")
        if os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "").lower() == "true":
            out.gradient_checkpointing = True
        if out.device_map not in (None, "auto"):
            raise ConfigError("--device-map takes only auto (spread the model over this node's GPUs)")
        check_device(out.device)
        if out.pairs not in ("first", "all"):
            raise ConfigError("--pairs must be first or all")
        if out.pairs == "all" and self.task not in PAIRS_TASKS:
            raise ConfigError(f"--pairs all: only {', '.join(PAIRS_TASKS)} has several incorrect answers to pair; "
                              + (f"{self.task}'s pairs are as its data gives them" if self.task == "dpo-jsonl"
                                 else f"{self.task} is trained on completions, not pairs"))
        if out.select_epoch not in ("last", "best"):
            raise ConfigError("--select-epoch must be last or best")
        if out.search_budget is not None and out.search_budget < 1:
            raise ConfigError("--search-budget must be at least 1")
        if out.search_budget is not None and not out.search:
            raise ConfigError("--search-budget bounds a --search; give the grid too")
        name = Path(out.out).name
        if name in ("", ".", ".."):
            raise ConfigError(f"--out {out.out!r}: give the path of the adapter directory to write, e.g. "
                              "adapters/my-task")
        for name in ("epochs", "epochs_a", "epochs_v", "batch_size", "grad_accum", "max_prompt_len", "max_len"):
            if getattr(out, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("lr_a", "lr_v", "beta", "init_std", "max_grad_norm"):
            value = getattr(out, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive number")
        if not (math.isfinite(out.l1) and out.l1 >= 0):
            raise ConfigError("--l1 must be >= 0")
        if not task.folds:
            if out.fold is not None:
                raise ConfigError(f"--fold is only for tasks with folds (truthfulqa); {self.task} has none")
        elif out.fold is None:
            out.fold = 0
        elif out.fold not in (0, 1):
            raise ConfigError("--fold must be 0 or 1")
        if out.val_data is not None and not task.val_data:
            raise ConfigError(f"--val-data is only for the jsonl tasks (sft-jsonl, dpo-jsonl); {self.task} brings "
                              "its own validation split")
        if out.limit is not None and out.limit < 1:
            raise ConfigError("--limit must be at least 1")
        return out

    def num_heads(self, total_heads: int) -> int:
        """K (:func:`lofit.heads.choose_k`); raises :class:`ConfigError`."""
        try:
            return choose_k(total_heads, self.heads, self.heads_percent)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def hyperparameters(self) -> dict[str, Any]:
        """What the adapter records (paths and switches that do not change the result left out)."""
        skip = {"model", "out", "data", "val_data", "name", "progress", "device", "heads_from", "distributed",
                "device_map", "gradient_checkpointing", "search", "search_budget"}
        return {k: v for k, v in asdict(self).items() if k not in skip}

    @classmethod
    def from_file(cls, path: str | Path) -> dict[str, Any]:
        """Settings from a JSON config file (keys are the field names, e.g. ``lr_v``)."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown settings {unknown}")
        for f in fields(cls):
            if f.name in data:
                _check_type(path, f.name, data[f.name], str(f.type))
        return data


# a field's annotation (a string: this module has postponed annotations) -> (accepts, what to ask for)
_KINDS = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "dict": (lambda v: isinstance(v, dict), 'a JSON object such as {"lr_v": [0.01, 0.05]}'),
}


def _check_type(path: str | Path, name: str, value: Any, annotation: str) -> None:
    """Raise :class:`ConfigError` unless a config file's ``value`` has the type of the field ``name``: a JSON
    string where a number belongs, ``true`` where an integer belongs, and so on, would otherwise fail late."""
    if value is None and "None" in annotation:
        return
    base = annotation.split("|")[0].strip().split("[")[0]
    accepts, wanted = _KINDS[base]
    if not accepts(value):
        raise ConfigError(f"{path}: {name} must be {wanted}{' or null' if 'None' in annotation else ''}, not "
                          f"{json.dumps(value)}")
