"""MQuAKE single-edit cases (the splits ship in ``lofit/data/mquake``).

- Training (``lofit-method.md`` §8.2): completion-only SFT, prompt
  ``"Q: Imagine that {edit} {new target}. {first question} A:"``, completion = the new answer, joined with no
  space.
- Evaluation (§9.2): the greedy completion (16 new tokens) of the same prompt; exact match = the text after
  the last ``"A:"`` up to the first newline, lower-cased, equals the new answer or one of its aliases (the
  reference's rule; ``exact_match_stripped`` also forgives surrounding whitespace, a diagnostic).
- Probe texts (ITI): ``prompt + new_answer`` (1) and ``prompt + answer`` (the pre-edit answer, 0).

``python -m lofit.eval.rescore_mquake REPORT.json ...`` recomputes both exact-match numbers of saved
``lofit-eval`` reports from their predictions (:func:`rescore`).
"""

from __future__ import annotations

import json
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

NEW_TOKENS = 16


def read_cases(path: Path) -> list[dict[str, Any]]:
    """Every case of a JSON-lines file; raises :class:`TaskError` naming the line of invalid JSON."""
    return read_jsonl(path)


def prompt_of(case: dict[str, Any]) -> str:
    """The reference prompt for a case (first edit, first question)."""
    rewrite = case["requested_rewrite"][0]
    fact = rewrite["prompt"].format(rewrite["subject"])
    return f"Q: Imagine that {fact} {rewrite['target_new']['str']}. {case['questions'][0]} A:"


def to_example(case: dict[str, Any], where: str) -> SFTExample:
    """One case as an SFT example; raises :class:`TaskError` naming ``where`` for a malformed case."""
    try:
        return SFTExample(prompt_of(case), case["new_answer"])
    except (KeyError, IndexError, TypeError) as exc:
        raise TaskError(f"{where}: not an MQuAKE case (missing {exc})") from exc


def load_mquake(data_dir: str | Path | None = None) -> TaskData:
    """The SFT examples of the train and val splits (``data_dir`` defaults to the shipped folder)."""
    root = Path(data_dir) if data_dir else PACKAGE_DATA / "mquake"
    paths = {split: require_file(root / f"{split}.jsonl") for split in ("train", "val")}
    cases = {split: read_cases(path) for split, path in paths.items()}
    examples = {split: [to_example(c, f"{paths[split]} case {i}") for i, c in enumerate(cases[split])]
                for split in paths}
    return TaskData(name="mquake", loss="sft", train=examples["train"], val=examples["val"],
                    sources=[file_identity(paths[s], len(cases[s])) for s in ("train", "val")])


# --- evaluation: exact match ---------------------------------------------------------------------------

def prediction(decoded: str) -> str:
    """The predicted answer in prompt + completion: after the last ``"A:"``, up to the first newline, lower-cased."""
    return decoded.split("A:")[-1].split("\n")[0].lower()


def is_correct(decoded: str, case: dict[str, Any], strip: bool = False) -> bool:
    """The reference's rule; ``strip=True`` also forgives whitespace around the prediction (diagnostic)."""
    gold = {case["new_answer"].lower(), *(a.lower() for a in case.get("new_answer_alias", []))}
    predicted = prediction(decoded)
    return (predicted.strip() if strip else predicted) in gold


def exact_match(completions: list[str], cases: list[dict[str, Any]], strip: bool = False) -> float:
    """Exact match (a fraction) of greedy completions; ``strip=True`` gives the diagnostic beside the reference's."""
    hits = [is_correct(prompt_of(case) + c, case, strip=strip) for c, case in zip(completions, cases, strict=True)]
    return sum(hits) / len(cases)


def eval_items(data: str | Path | None = None, split: str = "test", fold: int = 0, limit: int | None = None,
               seed: int = 0) -> list[dict[str, Any]]:
    """The cases of ``split`` (a seeded sample of ``limit`` when given)."""
    root = Path(data) if data else PACKAGE_DATA / "mquake"
    path = require_file(root / f"{split}.jsonl")
    cases = read_cases(path)
    for number, case in enumerate(cases, start=1):
        to_example(case, f"{path} case {number}")  # a malformed case fails here, before any model loads
    return sample(cases, limit, seed)


def evaluate(backend: Backend, cases: list[dict[str, Any]], adapter: str | None) -> dict[str, Any]:
    """Greedy completions of every case: ``{"exact_match", "exact_match_stripped", "items", "predictions"}``
    (predictions cut to 200 characters)."""
    completions = backend.greedy([prompt_of(case) for case in cases], NEW_TOKENS, adapter)
    return {"exact_match": exact_match(completions, cases), "items": len(cases),
            "predictions": [c[:200] for c in completions],
            "exact_match_stripped": exact_match(completions, cases, strip=True)}


def rescore(report: str | Path) -> list[tuple[str, float, float]]:
    """(label, exact match, stripped exact match) for every model of a saved MQuAKE ``lofit-eval`` report,
    recomputed from its predictions on the packaged split it was scored on. Raises :class:`TaskError`."""
    path = Path(report)
    if not path.is_file():
        raise TaskError(f"report {report} not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TaskError(f"{report} is not a lofit-eval JSON report: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise TaskError(f"{report} is not a lofit-eval JSON report (no 'results' list)")
    if data.get("task") != "mquake":
        raise TaskError(f"{report} is a {data.get('task')!r} report, not mquake")
    cases_of: dict[str, list[dict[str, Any]]] = {}
    rows = []
    for number, result in enumerate(data["results"], start=1):
        if not (isinstance(result, dict) and isinstance(result.get("split"), str)
                and isinstance(result.get("predictions"), list)):
            raise TaskError(f"{report}: result {number} lacks its 'split' or 'predictions'")
        split, predictions = result["split"], result["predictions"]
        if split not in cases_of:
            cases_of[split] = eval_items(split=split, limit=data.get("limit"), seed=data.get("seed", 0))
        cases = cases_of[split]
        if len(cases) != len(predictions):
            raise TaskError(f"{report}: {result.get('label')} has {len(predictions)} predictions for {len(cases)} "
                            "cases")
        rows.append((result.get("label"), exact_match(predictions, cases), exact_match(predictions, cases, strip=True)))
    return rows


# --- probe texts (ITI) --------------------------------------------------------------------------------

PROBE_FORMAT = "Q: Imagine that {fact} {target_new}. {question} A:{answer}"


def mquake_texts(cases: list[dict[str, Any]]) -> ProbeTexts:
    """Per case: ``prompt_of(case) + new_answer`` (label 1), ``prompt_of(case) + answer`` (label 0).

    A case whose new and pre-edit answers are equal is skipped (groups stay 0, 1, 2, ... over the kept cases).
    """
    texts, labels, groups = [], [], []
    for number, case in enumerate(cases):
        try:
            prompt, true, false = prompt_of(case), case["new_answer"], case["answer"]
        except (KeyError, IndexError, TypeError) as exc:
            raise TaskError(f"MQuAKE case {number}: not an MQuAKE case (missing {exc})") from exc
        if true == false:
            continue
        group = groups[-1] + 1 if groups else 0
        texts += [prompt + true, prompt + false]
        labels += [1, 0]
        groups += [group, group]
    return ProbeTexts(texts, labels, groups)


def probe_texts(fold: int = 0, limit: int | None = None, seed: int = 42) -> ProbeTexts:
    """The probe texts of the first ``limit`` cases of the shipped train split (``fold``, ``seed`` unused)."""
    path = require_file(PACKAGE_DATA / "mquake" / "train.jsonl")
    all_cases = read_cases(path)
    cases = all_cases[:limit]
    texts = mquake_texts(cases)
    kept = len(set(texts.groups))
    texts.data = {"split": "train", "items": kept, "skipped_items": len(cases) - kept}
    texts.files = [file_identity(path, len(all_cases))]
    return texts

