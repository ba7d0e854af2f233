"""Generation tasks scored by exact match, with the reference's string handling (``lofit-method.md`` §9.3).

Greedy decoding, 16 new tokens; the prompt is the training prompt. The prediction is read from the decoded
prompt + completion exactly as the LoFiT code reads it, so numbers are comparable:

* MQuAKE: the text after the **last** ``"A:"``, up to the first newline, lower-cased, **not** stripped;
  correct iff it is the new answer or one of its aliases (lower-cased). A second, stripped score
  (``exact_match_stripped``) is reported beside it as a diagnostic: how much of a miss is a leading space.
* CLUTRR: the text after the first ``"'s\\n"``, up to the first ``"."``, stripped and lower-cased; correct iff
  it equals the target.
* GSM8K: the last number in the completion (commas removed), compared with the number after ``####``.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from lofit.tasks import clutrr, mquake
from lofit.tasks.base import PACKAGE_DATA, TaskError, require_file

NEW_TOKENS = 16
GSM8K_PROMPT = "Question: {question}\nAnswer: Let's think step by step."
GSM8K_NEW_TOKENS = 256
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def mquake_prediction(decoded: str) -> str:
    return decoded.split("A:")[-1].split("\n")[0].lower()


def mquake_correct(decoded: str, case: dict[str, Any], strip: bool = False) -> bool:
    """The reference's rule; ``strip=True`` also forgives whitespace around the prediction (diagnostic)."""
    gold = {case["new_answer"].lower(), *(a.lower() for a in case.get("new_answer_alias", []))}
    prediction = mquake_prediction(decoded)
    return (prediction.strip() if strip else prediction) in gold


def clutrr_prediction(decoded: str) -> str:
    if "'s\n" not in decoded:
        return ""
    return decoded.split("'s\n", 1)[1].split(".")[0].strip().lower()


def clutrr_correct(decoded: str, item: dict[str, Any]) -> bool:
    return clutrr_prediction(decoded) == item["target_text"].lower()


def gsm8k_number(text: str) -> str | None:
    """The last number in ``text``, without thousands separators or a trailing ``.0``."""
    text = text.split("Question:")[0]
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    number = numbers[-1].replace(",", "")
    return number[:-2] if number.endswith(".0") else number


def gsm8k_gold(answer: str) -> str:
    return answer.split("####")[-1].strip().replace(",", "")


def _sample(items: list, limit: int | None, seed: int) -> list:
    return items if limit is None or limit >= len(items) else random.Random(seed).sample(items, limit)


def load_generation_items(task: str, data: str | Path | None = None, split: str = "test",
                          limit: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    if task == "mquake":
        root = Path(data) if data else PACKAGE_DATA / "mquake"
        items = mquake.read_cases(require_file(root / f"{split}.jsonl"))
    elif task == "clutrr":
        if data is None:
            raise TaskError(clutrr.NO_DATA)
        items = clutrr.read_items(require_file(Path(data) / f"{split}.json", clutrr.NO_DATA))
    elif task == "gsm8k":
        path = Path(data) if data else PACKAGE_DATA / "gsm8k" / "test.jsonl"
        path = path / "test.jsonl" if path.is_dir() else path
        items = [json.loads(line) for line in require_file(path).read_text().splitlines() if line.strip()]
    else:
        raise TaskError(f"unknown generation task {task!r}")
    return _sample(items, limit, seed)


def evaluate_generation(backend, task: str, items: list[dict[str, Any]], adapter: str | None) -> dict:
    if task == "gsm8k":
        prompts = [GSM8K_PROMPT.format(question=item["question"]) for item in items]
        completions = backend.greedy(prompts, GSM8K_NEW_TOKENS, adapter)
        correct = [gsm8k_number(c) == gsm8k_gold(item["answer"]) for c, item in zip(completions, items, strict=True)]
    else:
        prompt_of = mquake.prompt_of if task == "mquake" else clutrr.prompt_of
        check = mquake_correct if task == "mquake" else clutrr_correct
        prompts = [prompt_of(item) for item in items]
        completions = backend.greedy(prompts, NEW_TOKENS, adapter)
        correct = [check(p + c, item) for p, c, item in zip(prompts, completions, items, strict=True)]
    result = {"exact_match": sum(correct) / len(items), "items": len(items),
              "predictions": [c[:200] for c in completions]}
    if task == "mquake":
        result["exact_match_stripped"] = mquake_exact_match(completions, items, strip=True)
    return result


def mquake_exact_match(completions: list[str], cases: list[dict[str, Any]], strip: bool = False) -> float:
    """MQuAKE exact match of greedy completions; ``strip=True`` gives the diagnostic beside the reference's."""
    hits = [mquake_correct(mquake.prompt_of(case) + c, case, strip=strip)
            for c, case in zip(completions, cases, strict=True)]
    return sum(hits) / len(cases)


def rescore_mquake(report: str | Path) -> list[tuple[str, float, float]]:
    """(label, exact match, stripped exact match) for every model of a saved MQuAKE report, recomputed
    from its predictions on the packaged split it was scored on."""
    try:
        data = json.loads(require_file(Path(report)).read_text())
    except json.JSONDecodeError as error:
        raise TaskError(f"{report} is not a lofit-eval JSON report: {error}") from None
    task = data.get("task") if isinstance(data, dict) else None
    if task != "mquake":
        raise TaskError(f"{report} is a {task!r} report, not mquake")
    cases_of: dict[str, list[dict[str, Any]]] = {}
    rows = []
    for result in data["results"]:
        split, predictions = result["split"], result["predictions"]
        if split not in cases_of:
            cases_of[split] = load_generation_items("mquake", split=split, limit=data.get("limit"),
                                                    seed=data.get("seed", 0))
        cases = cases_of[split]
        if len(cases) != len(predictions):
            raise TaskError(f"{report}: {result['label']} has {len(predictions)} predictions for {len(cases)} cases")
        rows.append((result["label"], mquake_exact_match(predictions, cases),
                     mquake_exact_match(predictions, cases, strip=True)))
    return rows


if __name__ == "__main__":
    import sys

    if len(sys.argv) < 2:
        sys.exit("usage: python -m lofit.eval.exact_match MQUAKE_REPORT.json [...]")
    for path in sys.argv[1:]:
        try:
            rows = rescore_mquake(path)
        except TaskError as error:
            sys.exit(f"error: {error}")
        for label, strict, stripped in rows:
            print(f"{path}\t{label}\texact_match {100 * strict:.1f}\tstripped {100 * stripped:.1f}")
