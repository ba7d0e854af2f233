"""``lofit-train --search``: a small grid of settings, each candidate scored on the validation split.

The paper tuned learning rates and K per task on validation data (Yin et al., 2024, §4 and appendix); this is
that loop as a tool. A candidate is exactly the run ``lofit-train`` would make with its settings, except that
stage 1 runs once per distinct stage-1 setting and its ranking is reused by every candidate that shares it
(K, the stage-2 learning rate and epochs never change stage 1). Each candidate's adapter is scored with the
task's metric on its validation split (:mod:`lofit.train.validation`); the best is written as the adapter, the
whole grid as ``search_report.json`` and ``search.png`` beside it. The test split is never read.

Grid syntax: ``--search lr_v=1e-2,5e-2 epochs_v=3,5 heads_percent=3,5`` on the command line, or
``"search": {"lr_v": [0.01, 0.05], ...}`` in ``--config``. ``--search-budget N`` keeps a seeded sample of N
candidates (grid order kept) when the grid is larger.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass, replace
from typing import Any

from lofit.train.config import ConfigError, TrainConfig

# setting -> type; stage-1 settings change the ranking, the others only stage 2
SEARCH_KEYS: dict[str, type] = {"lr_a": float, "l1": float, "epochs_a": int, "beta": float, "init_std": float,
                                "lr_v": float, "epochs_v": int, "heads": int, "heads_percent": float}
STAGE1_KEYS = ("lr_a", "l1", "epochs_a", "beta", "init_std")
STAGE1_ONLY = ("lr_a", "l1", "epochs_a")  # used by stage 1 alone (beta and init_std are stage 2's too)


def parse_grid(specs: list[str] | dict[str, Any]) -> dict[str, list]:
    """``["lr_v=1e-2,5e-2", "heads=8,16"]`` (or a config file's ``{"lr_v": [...]}``) as ``{key: [values]}``.

    Raises :class:`ConfigError` for an unknown key, a value of the wrong type, an empty or repeated list, or both
    ``heads`` and ``heads_percent``."""
    if isinstance(specs, dict):
        items = [(str(k), v if isinstance(v, list) else [v]) for k, v in specs.items()]
    elif isinstance(specs, str) or not isinstance(specs, list):
        raise ConfigError(f"--search: give KEY=V1,V2,... flags, or a JSON object in --config, not {specs!r}")
    else:
        items = []
        for spec in specs:
            key, sep, values = spec.partition("=")
            if not sep or not values.strip():
                raise ConfigError(f"--search {spec!r}: write KEY=V1,V2,... (keys: {', '.join(SEARCH_KEYS)})")
            items.append((key.strip().replace("-", "_"), [v.strip() for v in values.split(",")]))
    grid: dict[str, list] = {}
    for key, values in items:
        if key not in SEARCH_KEYS:
            raise ConfigError(f"--search: {key!r} cannot be searched; searchable: {', '.join(SEARCH_KEYS)}")
        if key in grid:
            raise ConfigError(f"--search: {key} is given twice")
        if not values:
            raise ConfigError(f"--search: {key} has no values")
        kind = SEARCH_KEYS[key]
        typed = []
        for value in values:
            try:
                typed.append(_typed(value, kind))
            except (TypeError, ValueError):
                raise ConfigError(f"--search: {key}={value!r} is not {'an integer' if kind is int else 'a number'}")\
                    from None
        if len(set(typed)) != len(typed):
            raise ConfigError(f"--search: {key} lists a value twice")
        grid[key] = typed
    if "heads" in grid and "heads_percent" in grid:
        raise ConfigError("--search: give heads or heads_percent, not both")
    if not grid:
        raise ConfigError("--search needs at least one KEY=V1,V2,...")
    return grid


def _typed(value: Any, kind: type) -> int | float:
    """A grid value as ``kind``, as strictly as the flag's own type: ``"1e20"`` and ``2.0`` are not integers,
    and a JSON ``true`` is not a number (raises ``ValueError``/``TypeError``)."""
    if isinstance(value, bool):
        raise TypeError(value)
    if isinstance(value, str):
        return int(value.strip()) if kind is int else float(value)
    if kind is int and not isinstance(value, int):
        raise TypeError(value)
    if not isinstance(value, (int, float)):
        raise TypeError(value)
    return kind(value)


MAX_CANDIDATES = 10_000  # a grid larger than this needs --search-budget (each candidate trains for minutes)


def candidates(cfg: TrainConfig, grid: dict[str, list], budget: int | None) -> tuple[list[TrainConfig], int]:
    """Every grid point as a resolved config (a seeded sample of ``budget`` of them, in grid order), and the size
    of the whole grid. Each is checked like a ``lofit-train`` run's flags (raises :class:`ConfigError`, also
    for stage-1 settings searched where stage 1 does not run, and for a grid of more than
    :data:`MAX_CANDIDATES` without a budget). The sample is drawn from the grid's indices, so a huge grid with
    a small budget costs nothing."""
    keys = list(grid)
    skipped = [k for k in keys if k in STAGE1_ONLY]
    if skipped and (cfg.random_heads or cfg.heads_from):
        raise ConfigError(f"--search {', '.join(skipped)}: stage 1 does not run with "
                          f"{'--random-heads' if cfg.random_heads else '--heads-from'}, so these settings would "
                          "make identical candidates")
    sizes = [len(grid[k]) for k in keys]
    total = math.prod(sizes)
    if budget is not None and budget < total:
        indices = sorted(random.Random(cfg.seed).sample(range(total), budget))
    elif total > MAX_CANDIDATES:
        raise ConfigError(f"--search: the grid has {total:,} candidates; give --search-budget N to run a sample "
                          f"of them (at most {MAX_CANDIDATES:,} without one)")
    else:
        indices = list(range(total))
    points = []
    for index in indices:  # itertools.product's order: the last key varies fastest
        point = {}
        for key, size in zip(reversed(keys), reversed(sizes), strict=True):
            index, position = divmod(index, size)
            point[key] = grid[key][position]
        points.append({key: point[key] for key in keys})
    out = []
    for point in points:
        heads = {"heads": point["heads"], "heads_percent": None} if "heads" in point else \
            {"heads_percent": point["heads_percent"], "heads": None} if "heads_percent" in point else {}
        settings = {k: v for k, v in point.items() if k not in ("heads", "heads_percent")}
        try:
            out.append(replace(cfg, **settings, **heads, search=None, search_budget=None).resolved())
        except ConfigError as exc:
            raise ConfigError(f"--search candidate {point}: {exc}") from None
    return out, total


def stage1_key(cfg: TrainConfig, k: int, how: str) -> tuple:
    """What stage 1's result depends on: candidates with equal keys share one ranking."""
    if how == "random":
        return ("random", k, cfg.seed)
    if how == "reused":
        return ("reused",)
    return ("stage1", *(getattr(cfg, name) for name in STAGE1_KEYS), cfg.seed)


@dataclass
class CandidateResult:
    """One candidate: its settings (those the grid varied), K, heads, score and wall time."""

    settings: dict[str, Any]
    k: int
    heads: list[list[int]]
    score: dict[str, Any]
    stage1_run: int | None  # index of the stage-1 run whose ranking it used (None: its stage 1 diverged)
    stage1_reused: bool
    seconds: float
    kept_epoch: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """As ``search_report.json`` lists it."""
        return dict(vars(self))


def search_png(results: list[CandidateResult], winner: int, metric: str, title: str) -> bytes:
    """A point per candidate (its validation metric), the winner highlighted; PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [math.nan if r.score["value"] is None else r.score["value"] for r in results]  # diverged: no point
    labels = [", ".join(f"{k}={v:g}" for k, v in r.settings.items()) + (" (diverged)" if "diverged" in r.score
                                                                          else "") for r in results]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(results) + 2), 4.5))
    ax.plot(range(len(results)), values, "o", color="tab:blue")
    ax.plot([winner], [values[winner]], "o", color="tab:orange", markersize=11, label="winner")
    ax.set_xticks(range(len(results)), labels, rotation=60, ha="right", fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
