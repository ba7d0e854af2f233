"""MQuAKE single-edit cases as completion-only SFT (``lofit-method.md`` §8.2).

Prompt ``"Q: Imagine that {edit} {new target}. {first question} A:"``; completion = the new answer,
joined with no space.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lofit.tasks.base import PACKAGE_DATA, SFTExample, TaskData, TaskError, file_identity, require_file


def read_cases(path: Path) -> list[dict[str, Any]]:
    cases = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                cases.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise TaskError(f"{path}:{number}: invalid JSON ({exc})") from exc
    return cases


def prompt_of(case: dict[str, Any]) -> str:
    """The reference prompt for a case (first edit, first question)."""
    rewrite = case["requested_rewrite"][0]
    fact = rewrite["prompt"].format(rewrite["subject"])
    return f"Q: Imagine that {fact} {rewrite['target_new']['str']}. {case['questions'][0]} A:"


def to_example(case: dict[str, Any], where: str) -> SFTExample:
    try:
        return SFTExample(prompt_of(case), case["new_answer"])
    except (KeyError, IndexError, TypeError) as exc:
        raise TaskError(f"{where}: not an MQuAKE case (missing {exc})") from exc


def load_mquake(data_dir: str | Path | None = None) -> TaskData:
    root = Path(data_dir) if data_dir else PACKAGE_DATA / "mquake"
    paths = {split: require_file(root / f"{split}.jsonl") for split in ("train", "val")}
    cases = {split: read_cases(path) for split, path in paths.items()}
    examples = {split: [to_example(c, f"{paths[split]} case {i}") for i, c in enumerate(cases[split])]
                for split in paths}
    return TaskData(name="mquake", loss="sft", train=examples["train"], val=examples["val"],
                    sources=[file_identity(paths[s], len(cases[s])) for s in ("train", "val")])
