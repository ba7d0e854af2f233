"""CLUTRR (k = 2 kinship chains).

- Training (``lofit-method.md`` §8.3): completion-only SFT of the relation after the ``"'s\n"`` template.
- Evaluation (§9.2): the greedy completion (16 new tokens) of the same prompt; exact match = the text after
  ``"'s\n"`` up to the first period, stripped and lower-cased, equals the target relation.

CLUTRR is CC BY-NC 4.0, so it is not shipped: pass its directory (train.json, val.json) with ``--data``.
The reference prompt keeps a parsing quirk (a leading space on the second name, hence double spaces);
it is kept so numbers stay comparable.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from lofit.tasks.base import Backend, SFTExample, TaskData, TaskError, file_identity, require_file, sample

NEW_TOKENS = 16

NO_DATA = ("CLUTRR is non-commercial (CC BY-NC 4.0) and not shipped with lofit; pass --data DIR with its "
           "train.json and val.json (for example the shared data folder's clutrr/)")


def parse_query(query: str) -> tuple[str, str]:
    """``"('Herman', 'Rosalee')"`` -> ``("Herman", " Rosalee")`` (the reference keeps the space)."""
    first, second = query.strip().strip("()").replace("'", "").split(",")
    return first, second


def prompt_of(item: dict[str, Any]) -> str:
    """The reference prompt, ending with the ``"'s\\n"`` response template."""
    story = item["clean_story"].replace("[", "").replace("]", "")
    p1, p2 = parse_query(item["query"])
    return (f'Read the following story about a family. "{story}" Assume the relations described in the story '
            "are all true. Based on relations between the fictional characters in the story (assume the "
            "relations are all true) and your commonsense knowledge about family relationship, how is "
            f"{p2} related to {p1}? Answer: {p2} is {p1} 's\n")


def read_items(path: Path) -> list[dict[str, Any]]:
    """The items of a CLUTRR JSON file; raises :class:`TaskError` if it is not a JSON list."""
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TaskError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(items, list):
        raise TaskError(f"{path}: expected a JSON list of CLUTRR items")
    return items


def to_example(item: dict[str, Any], where: str) -> SFTExample:
    """One item as an SFT example; raises :class:`TaskError` naming ``where`` for a malformed item."""
    try:
        return SFTExample(prompt_of(item), item["target_text"])
    except (KeyError, ValueError, AttributeError) as exc:
        raise TaskError(f"{where}: not a CLUTRR item ({exc})") from exc


def load_clutrr(data_dir: str | Path | None, train_size: int = 300, seed: int = 42) -> TaskData:
    """SFT examples: a seeded sample of ``train_size`` train items (the reference's), and every val item."""
    if data_dir is None:
        raise TaskError(NO_DATA)
    root = Path(data_dir)
    paths = {split: require_file(root / f"{split}.json", NO_DATA) for split in ("train", "val")}
    items = {split: read_items(path) for split, path in paths.items()}
    train = items["train"]
    if train_size and train_size < len(train):
        random.seed(seed)  # the reference samples with the global RNG right after seeding it
        train = random.sample(train, train_size)
    return TaskData(
        name="clutrr", loss="sft",
        train=[to_example(item, f"{paths['train']}") for item in train],
        val=[to_example(item, f"{paths['val']}") for item in items["val"]],
        sources=[file_identity(paths[s], len(items[s])) for s in ("train", "val")],
        options={"train_size": len(train)},
    )


def prediction(decoded: str) -> str:
    """The predicted relation in prompt + completion (empty when the template is missing)."""
    if "'s\n" not in decoded:
        return ""
    return decoded.split("'s\n", 1)[1].split(".")[0].strip().lower()


def is_correct(decoded: str, item: dict[str, Any]) -> bool:
    """Exact match of the predicted relation with the item's ``target_text`` (lower-cased)."""
    return prediction(decoded) == item["target_text"].lower()


def eval_items(data: str | Path | None = None, split: str = "test", fold: int = 0, limit: int | None = None,
               seed: int = 0) -> list[dict[str, Any]]:
    """The items of ``split`` from the CLUTRR folder ``data`` (required; a seeded sample of ``limit``)."""
    if data is None:
        raise TaskError(NO_DATA)
    path = require_file(Path(data) / f"{split}.json", NO_DATA)
    items = read_items(path)
    for number, item in enumerate(items, start=1):
        to_example(item, f"{path} item {number}")  # a malformed item fails here, before any model loads
    return sample(items, limit, seed)


def evaluate(backend: Backend, items: list[dict[str, Any]], adapter: str | None) -> dict[str, Any]:
    """Greedy completions of every item: ``{"exact_match", "items", "predictions"}``."""
    prompts = [prompt_of(item) for item in items]
    completions = backend.greedy(prompts, NEW_TOKENS, adapter)
    correct = [is_correct(p + c, item) for p, c, item in zip(prompts, completions, items, strict=True)]
    return {"exact_match": sum(correct) / len(items), "items": len(items),
            "predictions": [c[:200] for c in completions]}
