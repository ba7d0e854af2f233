"""Task loaders: the reference prompt strings, split sizes, and clear errors for bad data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lofit.tasks import PreferencePair, SFTExample, TaskError, load_task
from lofit.tasks.clutrr import parse_query
from lofit.tasks.clutrr import prompt_of as clutrr_prompt
from lofit.tasks.mquake import prompt_of as mquake_prompt

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.mark.parametrize(("fold", "train", "val"), [(0, 326, 82), (1, 327, 82)])
def test_truthfulqa_folds_give_one_pair_per_question(fold, train, val):
    task = load_task("truthfulqa", fold=fold)
    assert (len(task.train), len(task.val), task.loss) == (train, val, "dpo")
    assert task.identity()["fold"] == fold and len(task.identity()["files"]) == 2


def test_truthfulqa_pair_is_best_answer_against_first_incorrect():
    pair = load_task("truthfulqa", fold=0).train[0]
    assert pair == PreferencePair("Q: Can pigs fly? A:", "No, pigs cannot fly", "Yes, pigs can fly")


def test_mquake_prompt_matches_the_reference():
    task = load_task("mquake")
    assert (len(task.train), len(task.val), task.loss) == (134, 95, "sft")
    case = {"requested_rewrite": [{"prompt": "{} is a citizen of", "subject": "John Krasinski",
                                   "target_new": {"str": "Sweden"}}],
            "questions": ["Which country is the spouse of Emily Blunt a citizen of?", "unused"]}
    assert mquake_prompt(case) == ("Q: Imagine that John Krasinski is a citizen of Sweden. Which country is "
                                   "the spouse of Emily Blunt a citizen of? A:")
    assert task.train[0].completion == "Karl Döhler", "the new answer, joined with no space"


def test_clutrr_keeps_the_reference_double_space_quirk():
    assert parse_query("('Roy', 'Cleo')") == ("Roy", " Cleo")
    item = {"clean_story": "[Cleo] is [Roy]'s mother.", "query": "('Cleo', 'Roy')", "target_text": "son"}
    prompt = clutrr_prompt(item)
    assert prompt.startswith('Read the following story about a family. "Cleo is Roy\'s mother." Assume')
    assert prompt.endswith("how is  Roy related to Cleo? Answer:  Roy is Cleo 's\n")


def test_clutrr_needs_its_data_directory():
    with pytest.raises(TaskError, match="non-commercial"):
        load_task("clutrr")


@pytest.mark.skipif(not (SHARED_DATA / "clutrr").is_dir(), reason="shared CLUTRR data not present")
def test_clutrr_samples_300_training_stories_with_seed_42():
    task = load_task("clutrr", data=SHARED_DATA / "clutrr")
    again = load_task("clutrr", data=SHARED_DATA / "clutrr")
    assert (len(task.train), len(task.val)) == (300, 450)
    assert task.train == again.train
    assert all(isinstance(ex, SFTExample) and ex.prompt.endswith("'s\n") for ex in task.train)


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_tasks_read_prompt_completion_and_pairs(tmp_path):
    sft = write_lines(tmp_path / "sft.jsonl", [{"prompt": "2+2=", "completion": "4"}, ""])
    dpo = write_lines(tmp_path / "dpo.jsonl", [{"prompt": "Q", "chosen": "good", "rejected": "bad"}])
    assert load_task("sft-jsonl", data=sft).train == [SFTExample("2+2=", "4")]
    task = load_task("dpo-jsonl", data=dpo, val_data=dpo)
    assert task.train == task.val == [PreferencePair("Q", "good", "bad")]
    assert task.identity()["files"][0]["rows"] == 1 and len(task.identity()["files"][0]["sha256"]) == 64


@pytest.mark.parametrize(("rows", "message"), [
    (["{broken"], r"sft\.jsonl:1: invalid JSON"),
    ([{"prompt": "x"}], r":1: needs string field\(s\) \['completion'\]"),
    ([{"prompt": "x", "completion": ""}], "must not be empty"),
    ([[1, 2]], "expected an object"),
    ([""], "no examples"),
])
def test_jsonl_errors_name_the_line(tmp_path, rows, message):
    path = write_lines(tmp_path / "sft.jsonl", rows)
    with pytest.raises(TaskError, match=message):
        load_task("sft-jsonl", data=path)


def test_unknown_task_and_missing_files(tmp_path):
    with pytest.raises(TaskError, match="unknown task"):
        load_task("squad")
    with pytest.raises(TaskError, match="needs --data"):
        load_task("dpo-jsonl")
    with pytest.raises(TaskError, match="not found"):
        load_task("sft-jsonl", data=tmp_path / "missing.jsonl")
    with pytest.raises(TaskError, match="folds 0 and 1"):
        load_task("truthfulqa", fold=2)


def test_one_registry_gives_every_command_line_its_tasks():
    from lofit.baselines.cli import build_parser as baseline_parser
    from lofit.tasks import EVAL_TASKS, PROBE_TASKS, TASKS, TRAIN_TASKS, get_task
    from lofit.train.cli import build_parser as train_parser

    assert TRAIN_TASKS == ("truthfulqa", "mquake", "clutrr", "arc", "boolq", "sft-jsonl", "dpo-jsonl")
    assert EVAL_TASKS == ("truthfulqa", "mquake", "clutrr", "arc", "boolq", "winogrande", "siqa", "gsm8k")
    assert PROBE_TASKS == ("truthfulqa", "mquake", "arc", "boolq")
    train_task = next(a for a in train_parser()._actions if a.dest == "task")
    assert tuple(train_task.choices) == TRAIN_TASKS
    iti = baseline_parser()._subparsers._group_actions[0].choices["iti"]
    assert tuple(next(a for a in iti._actions if a.dest == "task").choices) == PROBE_TASKS
    assert {TASKS[t].eval.metric for t in EVAL_TASKS} == {"mc1", "exact_match", "accuracy"}
    with pytest.raises(TaskError, match="unknown task 'nope'; built-in tasks are truthfulqa, mquake"):
        get_task("nope")
    with pytest.raises(TaskError, match="task 'gsm8k' has no training data; the tasks with training data are "):
        load_task("gsm8k")
    with pytest.raises(TaskError, match="task 'winogrande' has no probe texts"):
        get_task("winogrande", "probe_texts")
