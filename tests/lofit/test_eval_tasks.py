"""lofit-eval's scoring rules, prompts and answer extraction, on hand-made cases and the real tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lofit.eval.backends import ModelBackend, TransformersBackend, split_continuations
from lofit.eval.cli import markdown
from lofit.tasks import clutrr, gsm8k, mquake
from lofit.tasks.base import TaskError
from lofit.tasks.commonsense import (
    PROMPT,
    MultipleChoiceItem,
    accuracy,
    answers_instruction,
    boolq_instruction,
    eval_items,
)
from lofit.tasks.truthfulqa import TruthfulQAItem, evaluate_mc, format_answer, question_context


def test_mquake_reads_after_the_last_answer_marker_and_does_not_strip():
    case = {"new_answer": "Sweden", "new_answer_alias": ["SE", "Sverige"]}
    prompt = "Q: Imagine that X is a citizen of Sweden. Which country is Y a citizen of? A:"
    assert mquake.prediction(prompt + "Sweden\nQ: next A: no") == " no"
    assert mquake.is_correct(prompt + "Sweden\nQ: more", case)
    assert mquake.is_correct(prompt + "sverige\n", case)
    assert not mquake.is_correct(prompt + " Sweden\n", case), "a leading space makes it wrong, as in the reference"
    assert mquake.is_correct(prompt + " Sweden\n", case, strip=True), "the stripped diagnostic forgives it"
    assert not mquake.is_correct(prompt + " Norway\n", case, strip=True)


class _FixedGreedy:
    """A backend boundary stand-in: returns the given completions for the prompts it is handed."""

    def __init__(self, completions):
        self.completions = completions

    def greedy(self, prompts, new_tokens, adapter):
        assert len(prompts) == len(self.completions)
        return self.completions


def _mquake_report(tmp_path, predictions, limit):
    report = {"task": "mquake", "limit": limit, "seed": 0,
              "results": [{"label": "a", "split": "test", "predictions": predictions}]}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    return path


def test_mquake_reports_the_stripped_score_beside_the_reference_score(tmp_path):
    cases = mquake.eval_items(limit=4, seed=0)
    completions = [cases[0]["new_answer"] + "\nQ:", " " + cases[1]["new_answer"], " wrong", ""]
    result = mquake.evaluate(_FixedGreedy(completions), cases, adapter=None)
    assert result["exact_match"] == 0.25
    assert result["exact_match_stripped"] == 0.5
    table = markdown({"task": "mquake", "results": [{"label": "a", "split": "test", **result}]})
    assert "| exact match | stripped (diagnostic) |" in table and "| a | test | 25.0 | 50.0 | 4 |" in table
    # the same numbers come back from a saved report's predictions
    path = _mquake_report(tmp_path, completions, limit=4)
    assert mquake.rescore(path) == [("a", 0.25, 0.5)]


def test_rescoring_refuses_a_report_it_cannot_match(tmp_path):
    with pytest.raises(TaskError, match="3 predictions for 4 cases"):
        mquake.rescore(_mquake_report(tmp_path, ["x"] * 3, limit=4))
    other = tmp_path / "boolq.json"
    other.write_text(json.dumps({"task": "boolq", "results": []}))
    with pytest.raises(TaskError, match="not mquake"):
        mquake.rescore(other)
    other.write_text("{not json")
    with pytest.raises(TaskError, match="not a lofit-eval JSON report"):
        mquake.rescore(other)


def test_clutrr_reads_the_relation_after_the_template():
    decoded = "... Answer:  Roy is Cleo 's\n Grandson. Then more."
    assert clutrr.prediction(decoded) == "grandson"
    assert clutrr.is_correct(decoded, {"target_text": "grandson"})
    assert not clutrr.is_correct("no template here", {"target_text": "grandson"})


@pytest.mark.parametrize(("text", "number"), [
    ("She makes 9 * 2 = $18 every day. The answer is 18.", "18"),
    ("It costs 1,200 dollars.\nQuestion: next one 5", "1200"),
    ("The result is -3.0", "-3"),
    ("no digits", None),
])
def test_gsm8k_takes_the_last_number_of_the_answer(text, number):
    assert gsm8k.answer_number(text) == number


def test_gsm8k_gold_is_after_the_marker():
    assert gsm8k.gold_number("Janet sells 9 eggs.\n#### 1,018") == "1018"


def test_choice_prompts_follow_the_training_format():
    assert answers_instruction("Which is hot?", ["ice", "fire"]) == (
        "Please choose the correct answer to the question: Which is hot?\n\nAnswer1: ice Answer2: fire\n\n"
        "Answer format: answer1/answer2")
    assert boolq_instruction("is water wet") == ("Please answer the following question with true or false, "
                                                  "question: is water wet?\n\nAnswer format: true/false")
    item = MultipleChoiceItem("Do it.", ("true", "false"), "true")
    assert item.prompt == PROMPT.format(instruction="Do it.") and item.prompt.endswith("### Response:\n")
    assert item.responses() == ["the correct answer is true", "the correct answer is false"]


def test_choice_accuracy_picks_the_highest_score():
    items = [MultipleChoiceItem("a", ("answer1", "answer2", "answer3"), "answer2"),
             MultipleChoiceItem("b", ("true", "false"), "true")]
    value, predictions = accuracy([[-3.0, -1.0, -2.0], [-2.0, -0.5]], items)
    assert predictions == ["answer2", "false"] and value == 0.5


@pytest.mark.parametrize(("task", "count", "labels"), [("arc", 1172, 4), ("boolq", 3270, 2), ("winogrande", 1267, 2)])
def test_shipped_choice_data_loads(task, count, labels):
    items = eval_items(task)
    assert len(items) == count
    assert all(item.answer in item.labels for item in items)
    assert max(len(item.labels) for item in items) >= labels
    assert len(eval_items(task, limit=10, seed=1)) == 10


class FixedScores:
    """A backend boundary stand-in: returns given scores, records what it was asked."""

    def __init__(self, scores):
        self.scores, self.requests = scores, None

    def batch_continuation_logprobs(self, requests, adapter):
        self.requests = requests
        return self.scores


def test_truthfulqa_scores_the_reference_continuations():
    item = TruthfulQAItem(question="Can pigs fly?", best_answer="No", correct_answers=["No", "They cannot"],
                          incorrect_answers=["Yes"])
    backend = FixedScores([[-1.0, -1.0, -2.0, -3.0]])
    result = evaluate_mc(backend, [item], adapter=None)
    [(prefix, continuations)] = backend.requests
    assert prefix == question_context("Can pigs fly?") + "\nA:"
    assert continuations == [" No.", " No.", " They cannot.", " Yes."]
    assert result["mc1"] == 1.0
    assert result["mc2"] == pytest.approx((2.718281828 ** -1 + 2.718281828 ** -2)
                                          / (2.718281828 ** -1 + 2.718281828 ** -2 + 2.718281828 ** -3))


@pytest.mark.slow
def test_transformers_backend_equals_the_validated_scorer(stories_dir, stories_model, stories_tokenizer):
    backend = TransformersBackend(stories_dir)
    context = question_context("Once upon a time, who was there?")
    answers = [format_answer(a) for a in ["A little girl", "A dog named Max", "Nobody"]]
    [expected] = ModelBackend(stories_model, stories_tokenizer).batch_continuation_logprobs(
        [(context + "\nA:", [" " + a for a in answers])], None)
    [got] = backend.batch_continuation_logprobs([(context + "\nA:", [" " + a for a in answers])], None)
    assert got == pytest.approx(expected, abs=1e-4)
    prefix_ids, [cont_ids] = split_continuations(stories_tokenizer, "Lily went", [" home"])
    assert prefix_ids + cont_ids == stories_tokenizer("Lily went home")["input_ids"]


@pytest.mark.slow
def test_lofit_eval_cli_writes_json_and_markdown(stories_dir, tmp_path):
    out = tmp_path / "arc.json"
    run = subprocess.run([sys.executable, "-m", "lofit.eval.cli", "--model", str(stories_dir), "--task", "arc",
                          "--limit", "3", "--backend", "transformers", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    [row] = report["results"]
    assert row["label"] == "base" and row["items"] == 3 and 0.0 <= row["accuracy"] <= 1.0
    assert len(row["predictions"]) == 3
    assert "| base | test |" in out.with_suffix(".md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--no-base"], ["--limit", "0"], ["--task", "siqa"], ["--fold", "1"],
                                   ["--split", "val"]])
def test_lofit_eval_cli_refuses_bad_input(stories_dir, tmp_path, extra):
    args = ["--model", str(stories_dir), "--task", "arc", "--backend", "transformers", "--out",
            str(tmp_path / "x.json"), *extra]
    run = subprocess.run([sys.executable, "-m", "lofit.eval.cli", *args], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2 and run.stderr.startswith("lofit-eval: ")
    assert not (tmp_path / "x.json").exists()


def test_instruction_training_data_uses_the_prompt_the_evaluation_scores():
    from lofit.tasks import load_task

    arc = load_task("arc")
    assert len(arc.val) == 111 and len(arc.train) == 1119 - 111
    example = arc.train[0]
    assert example.prompt.startswith(PROMPT.split("{instruction}")[0]) and example.prompt.endswith("### Response:\n")
    assert example.completion.startswith("the correct answer is answer")
    boolq = load_task("boolq")
    assert len(boolq.train) == 1000 and len(boolq.val) == 200
    # the evaluation's own instruction for an ARC test item has the training file's shape
    item = eval_items("arc", limit=1)[0]
    assert item.instruction.startswith("Please choose the correct answer to the question: ")
    assert item.instruction.endswith("Answer format: " + "/".join(item.labels))


def test_evaluation_data_problems_are_task_errors_before_any_model_loads(tmp_path):
    with pytest.raises(TaskError, match="ships one evaluation file .* scored as split 'test'"):
        eval_items("arc", split="val")
    with pytest.raises(TaskError, match="gsm8k ships its test split only"):
        gsm8k.eval_items(split="val")
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    with pytest.raises(TaskError, match="wrong.jsonl: not a arc evaluation file"):
        eval_items("arc", data=wrong)
    with pytest.raises(TaskError, match="wrong.jsonl: not a siqa evaluation file"):
        eval_items("siqa", data=wrong)
    with pytest.raises(TaskError, match="row 1 is not a GSM8K problem"):
        gsm8k.eval_items(data=wrong)
    (tmp_path / "test.jsonl").write_text(wrong.read_text())
    with pytest.raises(TaskError, match="not an MQuAKE case"):
        mquake.eval_items(data=tmp_path)
    (tmp_path / "test.json").write_text(json.dumps([{"query": "('a', 'b')"}]))
    with pytest.raises(TaskError, match="not a CLUTRR item"):
        clutrr.eval_items(data=tmp_path)
    (tmp_path / "winogrande").mkdir()
    (tmp_path / "winogrande" / "test.json").mkdir()
    with pytest.raises(TaskError, match="test.json is a directory; a data file is needed"):
        eval_items("winogrande", data=tmp_path / "winogrande")


def test_the_rescore_command_prints_both_numbers_or_one_line_errors(tmp_path):
    cases = mquake.eval_items(limit=4, seed=0)
    report = _mquake_report(tmp_path, [cases[0]["new_answer"] + "\nQ:", " " + cases[1]["new_answer"], "x", ""], 4)
    ok = subprocess.run([sys.executable, "-m", "lofit.eval.rescore_mquake", str(report)], capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0 and ok.stderr == ""
    assert ok.stdout == f"{report}\ta\texact_match 25.0\tstripped 50.0\n"
    for body, message in (('{"task": "mquake"}', "no 'results' list"), ("[1, 2]", "no 'results' list"),
                          ('{"task": "mquake", "results": [{"label": "a"}]}', "result 1 lacks its 'split'")):
        (tmp_path / "bad.json").write_text(body)
        bad = subprocess.run([sys.executable, "-m", "lofit.eval.rescore_mquake", str(tmp_path / "bad.json")],
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and bad.stderr.startswith("rescore_mquake: error: ") and message in bad.stderr
        assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
