"""Generic tasks from JSON-lines files: ``sft-jsonl`` (prompt, completion) and ``dpo-jsonl``
(prompt, chosen, rejected)."""

from __future__ import annotations

import json
from pathlib import Path

from lofit.tasks.base import PreferencePair, SFTExample, TaskData, TaskError, file_identity, read_text, require_file


def _read(path: Path, fields: tuple[str, ...]) -> list[dict[str, str]]:
    rows = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskError(f"{path}:{number}: invalid JSON ({exc})") from exc
        if not isinstance(row, dict):
            raise TaskError(f"{path}:{number}: expected an object with keys {list(fields)}")
        missing = [f for f in fields if not isinstance(row.get(f), str)]
        if missing:
            raise TaskError(f"{path}:{number}: needs string field(s) {missing}")
        if not all(row[f] for f in fields[1:]):
            raise TaskError(f"{path}:{number}: {list(fields[1:])} must not be empty")
        if "chosen" in fields and row["chosen"] == row["rejected"]:
            raise TaskError(f"{path}:{number}: chosen and rejected are the same answer (the pair teaches nothing)")
        rows.append(row)
    if not rows:
        raise TaskError(f"{path}: no examples")
    return rows


def _load(name: str, loss: str, data: str | Path | None, val_data: str | Path | None,
          fields: tuple[str, ...], make) -> TaskData:
    if data is None:
        raise TaskError(f"task {name} needs --data FILE.jsonl with fields {list(fields)}")
    paths = {"train": require_file(Path(data))}
    if val_data is not None:
        paths["val"] = require_file(Path(val_data))
    rows = {split: _read(path, fields) for split, path in paths.items()}
    return TaskData(name=name, loss=loss, train=[make(r) for r in rows["train"]],
                    val=[make(r) for r in rows.get("val", [])],
                    sources=[file_identity(paths[s], len(rows[s])) for s in paths])


def load_sft_jsonl(data: str | Path | None, val_data: str | Path | None = None) -> TaskData:
    """SFT examples from JSON lines with non-empty string ``prompt`` and ``completion`` (``val_data`` optional);
    raises :class:`TaskError` naming the file and line of a bad row."""
    return _load("sft-jsonl", "sft", data, val_data, ("prompt", "completion"),
                 lambda r: SFTExample(r["prompt"], r["completion"]))


def load_dpo_jsonl(data: str | Path | None, val_data: str | Path | None = None) -> TaskData:
    """DPO pairs from JSON lines with string ``prompt`` and non-empty ``chosen`` and ``rejected``
    (``val_data`` optional); raises :class:`TaskError` naming the file and line of a bad row."""
    return _load("dpo-jsonl", "dpo", data, val_data, ("prompt", "chosen", "rejected"),
                 lambda r: PreferencePair(r["prompt"], r["chosen"], r["rejected"]))
