"""Baselines in the adapter format: ITI (``lofit-baseline iti``) and random-heads LoFiT (``--random-heads``)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from lofit.adapter import load_adapter
from lofit.baselines.cli import main as baseline_main
from lofit.baselines.iti import (
    as_tensors,
    fit_heads,
    head_activations,
    iti_offsets,
    split_questions,
)
from lofit.eval.cli import adapter_fold
from lofit.heads import HeadLayout, identity_from_checkpoint
from lofit.intervene import apply_adapters
from lofit.tasks import TASKS, TaskError
from lofit.tasks.base import PACKAGE_DATA
from lofit.tasks.commonsense import PROBE_FORMAT as INSTRUCT_TEXT_FORMAT
from lofit.tasks.commonsense import PROMPT, RESPONSE, answer_labels, instruct_rows, instruct_texts, load_instruct
from lofit.tasks.mquake import PROBE_FORMAT as MQUAKE_TEXT_FORMAT
from lofit.tasks.mquake import mquake_texts, prompt_of, read_cases
from lofit.tasks.truthfulqa import fold_file, qa_texts, read_items
from lofit.train.cli import main as train_main
from lofit.train.stage1 import random_selection, rank_heads

LOFIT_BASELINE = Path(sys.executable).with_name("lofit-baseline")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """stories260K is tiny: one thread is as fast, and is not slowed down by other work on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_qa_texts_label_every_answer_and_group_by_question():
    items = read_items(fold_file(0, "train"))[:3]
    labelled = qa_texts(items)
    first = items[0]
    assert labelled.texts[0] == f"Q: {first.question}\nA: {first.correct_answers[0]}"
    expected = sum(len(set(i.correct_answers)) + len(set(i.incorrect_answers)) for i in items)
    assert len(labelled.texts) == len(labelled.labels) == len(labelled.groups) == expected
    assert sum(labelled.labels) == sum(len(set(i.correct_answers)) for i in items)
    assert labelled.groups == sorted(labelled.groups) and set(labelled.groups) == {0, 1, 2}


def test_mquake_texts_pair_the_new_and_the_pre_edit_answer():
    cases = read_cases(PACKAGE_DATA / "mquake" / "train.jsonl")[:3]
    labelled = mquake_texts(cases)
    first = cases[0]
    rewrite = first["requested_rewrite"][0]
    assert labelled.texts[:2] == [prompt_of(first) + first["new_answer"], prompt_of(first) + first["answer"]]
    assert labelled.texts[0] == MQUAKE_TEXT_FORMAT.format(
        fact=rewrite["prompt"].format(rewrite["subject"]), target_new=rewrite["target_new"]["str"],
        question=first["questions"][0], answer=first["new_answer"])
    assert labelled.texts[0].endswith(" A:" + first["new_answer"]), "joined with no space, as lofit-train does"
    assert labelled.labels == [1, 0] * 3 and labelled.groups == [0, 0, 1, 1, 2, 2]

    same = {**cases[1], "answer": cases[1]["new_answer"]}
    skipped = mquake_texts([cases[0], same, cases[2]])
    assert skipped.groups == [0, 0, 1, 1] and skipped.texts[2] == prompt_of(cases[2]) + cases[2]["new_answer"]
    source = TASKS["mquake"].probe_texts(limit=5)
    assert source.data == {"split": "train", "items": 5, "skipped_items": 0} and len(source.texts) == 10


def test_instruct_texts_arc_row_gives_one_true_and_a_false_per_other_label():
    row = instruct_rows("arc").train[0]
    assert answer_labels(row["instruction"]) == ["answer1", "answer2", "answer3", "answer4"]
    labelled = instruct_texts([row])
    prompt = PROMPT.format(instruction=row["instruction"])
    assert labelled.texts[0] == prompt + row["output"] == INSTRUCT_TEXT_FORMAT.format(
        instruction=row["instruction"], label=row["answer"])
    assert labelled.labels == [1, 0, 0, 0] and labelled.groups == [0, 0, 0, 0]
    others = [label for label in ("answer1", "answer2", "answer3", "answer4") if label != row["answer"]]
    assert labelled.texts[1:] == [prompt + RESPONSE.format(label=label) for label in others]

    made = {"instruction": "Pick one.\n\nAnswer format: answer1/answer2/answer3", "output": "", "answer": "answer2"}
    assert [t[-7:] for t in instruct_texts([made]).texts] == ["answer2", "answer1", "answer3"]
    with pytest.raises(TaskError, match="answer 'answer9' is not one of the labels"):
        instruct_texts([{**made, "answer": "answer9"}])
    with pytest.raises(TaskError, match="does not end in 'Answer format:"):
        answer_labels("Pick one.")


def test_instruct_texts_boolq_row_gives_one_true_and_one_false():
    rows = instruct_rows("boolq").train[:5]
    labelled = instruct_texts(rows)
    assert labelled.labels == [1, 0] * 5 and labelled.groups == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    for row, true, false in zip(rows, labelled.texts[::2], labelled.texts[1::2], strict=True):
        other = {"true": "false", "false": "true"}[row["answer"]]
        assert true == PROMPT.format(instruction=row["instruction"]) + row["output"]
        assert false == PROMPT.format(instruction=row["instruction"]) + f"the correct answer is {other}"
    assert TASKS["boolq"].probe_texts().data["items"] == 1000, "capped like lofit-train's default"
    assert TASKS["boolq"].probe_texts(limit=1500).data["items"] == 1500, "--limit replaces the cap"


@pytest.mark.parametrize("seed", [42, 7])
def test_arc_texts_are_the_training_rows_and_never_the_val_rows(seed):
    source = TASKS["arc"].probe_texts(seed=seed)
    trained = load_instruct("arc", seed=seed)
    true_texts = [t for t, label in zip(source.texts, source.labels, strict=True) if label]
    assert true_texts == [ex.prompt + ex.completion for ex in trained.train], "the rows lofit-train trains on"
    prompts = Counter(t.rpartition("### Response:\n")[0] + "### Response:\n" for t in true_texts)
    everything = Counter(PROMPT.format(instruction=r["instruction"])
                         for r in json.loads((PACKAGE_DATA / "arc" / "train.json").read_text()))
    assert everything - prompts == Counter(ex.prompt for ex in trained.val), "exactly the val rows are left out"
    assert source.data == {"split": "train", "items": 1119 - 111, "held_out_val_rows": 111, "split_seed": seed}
    assert TASKS["arc"].probe_texts(seed=seed, limit=12).texts == source.texts[:48]


def test_split_holds_out_whole_questions_with_a_seed():
    groups = torch.arange(50).repeat_interleave(3)
    held_out = split_questions(groups, seed=0)
    per_question = held_out.view(50, 3)
    assert (per_question.all(1) | ~per_question.any(1)).all(), "answers of one question stay together"
    assert int(per_question[:, 0].sum()) == 10, "20 % of the questions"
    assert torch.equal(split_questions(groups, seed=0), held_out)
    assert not torch.equal(split_questions(groups, seed=1), held_out)


def test_offset_is_alpha_sigma_theta_on_hand_made_activations():
    # Two questions, each with one true and one false answer; 1 layer x 2 heads x head_dim 2.
    #   head 0: true (1, 0), (3, 0); false (-1, 0), (-3, 0): theta = (1, 0); projections 1, 3, -1, -3 -> sigma = sqrt(5)
    #   head 1: true (1, 1), (1, 1); false (0, 0), (0, 0): theta = (1, 1)/sqrt(2); projections sqrt2, sqrt2, 0, 0
    #           -> sigma = sqrt(2)/2, so alpha * sigma * theta = (alpha/2, alpha/2)
    head0 = torch.tensor([[1.0, 0], [-1, 0], [3, 0], [-3, 0]])
    head1 = torch.tensor([[1.0, 1], [0, 0], [1, 1], [0, 0]])
    activations = torch.stack([head0, head1], dim=1).unsqueeze(1)  # [4, 1, 2, 2]
    labels, groups = torch.tensor([1, 0, 1, 0]), torch.tensor([0, 0, 1, 1])

    probes = fit_heads(activations, labels, groups, seed=0)

    assert torch.allclose(probes.directions[0, 0], torch.tensor([1.0, 0.0]))
    assert torch.allclose(probes.directions[0, 1], torch.tensor([1.0, 1.0]) / math.sqrt(2))
    assert probes.sigma[0].tolist() == pytest.approx([math.sqrt(5), math.sqrt(2) / 2], rel=1e-6)
    offsets = iti_offsets(probes, [(0, 0), (0, 1)], alpha=15.0)
    assert offsets.dtype == torch.float32
    assert torch.allclose(offsets, torch.tensor([[15 * math.sqrt(5), 0.0], [7.5, 7.5]]), atol=1e-5)
    assert probes.accuracy[0, 0] == 1.0, "head 0 separates the held-out question"


def test_probe_accuracy_separates_signal_from_noise():
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([1, 0]).repeat(100)
    groups = torch.arange(100).repeat_interleave(2)
    activations = torch.randn(200, 1, 2, 4, generator=gen)
    activations[:, 0, 0, 2] += 3.0 * (2 * labels - 1)  # head (0, 0) carries the label; head (0, 1) is noise
    probes = fit_heads(activations, labels, groups, seed=0)
    assert probes.accuracy[0, 0] > 0.95 and probes.accuracy[0, 1] < 0.75
    assert probes.directions[0, 0, 2] > 0.95, "theta points along the planted coordinate"


@torch.no_grad()
def test_activations_are_each_heads_output_at_the_last_real_token(stories_model, stories_tokenizer):
    texts = ["Q: Can pigs fly?\nA: No", "Q: Is the sky blue?\nA: Yes, on a clear day it is", "Q: Hi?\nA: Hello"]
    batched = head_activations(stories_model, stories_tokenizer, texts, batch_size=3)  # right-padded
    seen = []
    handle = stories_model.model.layers[2].self_attn.o_proj.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0][0, -1].clone()))
    for text in texts:
        stories_model(torch.tensor([stories_tokenizer(text).input_ids]))
    handle.remove()
    assert batched.shape == (3, 5, 8, 8)
    for row, expected in enumerate(seen):
        assert torch.allclose(batched[row, 2].flatten(), expected, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("planted", [(1, 6), (3, 2)])
def test_probes_rank_a_planted_head_first(stories_model, stories_tokenizer, planted):
    """Make one head's output carry the label (±3 along a fixed direction) and check ITI ranks it first.

    The head's ``o_proj`` columns are zeroed, so the planted signal reaches no later head: only the planted
    head can separate true from false answers beyond what the model itself encodes.
    """
    layer, head = planted
    columns = slice(head * 8, (head + 1) * 8)
    o_proj = stories_model.model.layers[layer].self_attn.o_proj
    o_proj.weight[:, columns] = 0
    labelled = qa_texts(read_items(fold_file(0, "train"))[:30])
    labels, groups = as_tensors(labelled)
    signs = (2 * labels - 1).float()
    direction = torch.nn.functional.normalize(torch.randn(8, generator=torch.Generator().manual_seed(1)), dim=0)
    rows_done = 0

    def plant(_module, args):
        nonlocal rows_done
        x = args[0].clone()
        x[..., columns] += 3.0 * signs[rows_done:rows_done + x.shape[0], None, None] * direction
        rows_done += x.shape[0]
        return (x, *args[1:])

    handle = o_proj.register_forward_pre_hook(plant)
    activations = head_activations(stories_model, stories_tokenizer, labelled.texts, batch_size=64)
    handle.remove()
    probes = fit_heads(activations, labels, groups, seed=0)

    assert rank_heads(probes.accuracy)[0] == planted
    others = probes.accuracy.clone()
    others[planted] = 0
    assert probes.accuracy[planted] > 0.95 and others.max() < probes.accuracy[planted] - 0.1
    assert torch.dot(probes.directions[planted], direction) > 0.95


@pytest.fixture(scope="module")
def iti_adapter(tmp_path_factory, stories_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("iti") / "iti-tqa"
    assert baseline_main(["iti", "--model", str(stories_dir), "--fold", "1", "--heads-percent", "10",
                          "--limit", "12", "--seed", "3", "--out", str(out), "--no-progress"]) == 0
    return out


def test_iti_adapter_loads_for_the_base_model_and_steers(iti_adapter, stories_dir, stories_model):
    adapter = load_adapter(iti_adapter, expect_base=identity_from_checkpoint(stories_dir))
    assert adapter.num_heads == 4 and adapter.task == "truthfulqa" and adapter.name == "iti-tqa"
    assert adapter.offsets.dtype == torch.float32 and adapter.scales is None
    meta = adapter.metadata
    assert (meta["method"], meta["alpha"], meta["fold"], meta["num_heads_selected"]) == ("iti", 15.0, 1, 4)
    assert meta["hyperparameters"]["fold"] == 1, "lofit-eval reads the fold from here"
    assert meta["data"]["questions"] == 12 and meta["data"]["text_format"] == "Q: {question}\nA: {answer}"
    assert sorted(meta["probe_accuracy"]) == sorted(f"{layer},{head}" for layer, head in adapter.head_list())
    ranking = [tuple(h) for h in meta["selection"]["ranking"]]
    assert adapter.head_list() == sorted(ranking[:4]) and len(ranking) == 40
    for (layer, head), offset in zip(adapter.head_list(), adapter.offsets, strict=True):
        assert offset.norm().item() == pytest.approx(15.0 * meta["activation_std"][f"{layer},{head}"], rel=1e-4)
    assert (iti_adapter / "heads.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    ids = torch.tensor([[1, 45, 67, 89, 120, 33]])
    with torch.no_grad():
        plain = stories_model(ids).logits
        with apply_adapters(stories_model, adapter):
            steered = stories_model(ids).logits
    assert (steered - plain).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize(("task", "limit", "texts"), [("arc", 12, 48), ("boolq", 6, 12), ("mquake", 10, 20)])
def test_iti_for_another_task_writes_an_adapter_of_that_task(stories_dir, tmp_path, capsys, task, limit, texts):
    out = tmp_path / f"iti-{task}"
    assert baseline_main(["iti", "--model", str(stories_dir), "--task", task, "--limit", str(limit), "--heads", "3",
                          "--out", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    adapter = load_adapter(out, expect_base=identity_from_checkpoint(stories_dir))
    assert adapter.task == task and adapter.name == f"iti-{task}" and adapter.num_heads == 3
    meta = adapter.metadata
    assert meta["method"] == "iti" and meta["data"]["task"] == task and meta["data"]["items"] == limit
    assert (meta["data"]["texts"], meta["data"]["true_texts"]) == (texts, limit)
    expected_format = MQUAKE_TEXT_FORMAT if task == "mquake" else PROMPT + RESPONSE
    assert meta["data"]["text_format"] == expected_format
    assert "fold" not in meta and "fold" not in meta["hyperparameters"] and adapter_fold(adapter) is None
    assert json.loads(capsys.readouterr().out)["heads"] == [list(h) for h in adapter.head_list()]


@pytest.mark.parametrize(("args", "message"), [
    (["--heads", "2"], "missing required setting(s): --out"),
    (["--heads", "2", "--heads-percent", "3", "--out", "X"], "exactly one of --heads K or --heads-percent P"),
    (["--heads", "41", "--out", "X", "--limit", "2"], "exceeds the model's 40 heads"),
    (["--heads", "2", "--fold", "2", "--out", "X"], "folds 0 and 1"),
    (["--heads", "2", "--alpha", "-1", "--out", "X"], "--alpha must be a positive number"),
    (["--heads", "2", "--limit", "1", "--out", "X"], "--limit must be at least 2"),
    (["--task", "arc", "--fold", "0", "--heads", "2", "--out", "X"],
     "--fold is only for --task truthfulqa (arc has no folds)"),
    (["--heads", "2", "--search-alpha", "1,x", "--out", "X"], "--search-alpha '1,x': write numbers"),
    (["--heads", "2", "--search-alpha", "5,5", "--out", "X"], "--search-alpha needs distinct positive numbers"),
])
def test_iti_bad_input_gets_a_clear_error(stories_dir, tmp_path, capsys, args, message):
    args = [a.replace("X", str(tmp_path / "x")) for a in args]
    assert baseline_main(["iti", "--model", str(stories_dir), *args, "--no-progress"]) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("lofit-baseline: error: ") and message in last_line
    assert not (tmp_path / "x").exists(), "nothing is written on error"


def test_iti_alpha_is_chosen_on_the_validation_split(stories_dir, tmp_path, capsys):
    out = tmp_path / "iti"
    assert baseline_main(["iti", "--model", str(stories_dir), "--heads", "3", "--limit", "8", "--search-alpha",
                          "1,5,15", "--out", str(out), "--no-progress"]) == 0
    adapter = load_adapter(out)
    search = adapter.metadata["alpha_search"]
    assert search["metric"] == "mc1" and [r["alpha"] for r in search["results"]] == [1.0, 5.0, 15.0]
    keys = [(r["score"]["value"], r["score"]["tie"]) for r in search["results"]]
    assert search["alpha"] == search["results"][keys.index(max(keys))]["alpha"]
    assert adapter.metadata["alpha"] == search["alpha"] == adapter.metadata["hyperparameters"]["alpha"]
    assert json.loads(capsys.readouterr().out)["alpha_search"]["alpha"] == search["alpha"]


def test_iti_model_that_is_not_a_checkpoint(tmp_path, capsys):
    assert baseline_main(["iti", "--model", str(tmp_path), "--heads", "2", "--out", str(tmp_path / "x")]) == 2
    assert "not a Hugging Face checkpoint directory" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_lofit_baseline_console_script_help():
    command = [str(LOFIT_BASELINE)] if LOFIT_BASELINE.exists() else [sys.executable, "-m", "lofit.baselines.cli"]
    result = subprocess.run([*command, "iti", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for flag in ("--model", "--task", "--fold", "--heads-percent", "--alpha", "--seed", "--limit", "--out"):
        assert flag in result.stdout


def test_random_selection_is_seeded_uniform_and_distinct():
    layout = HeadLayout(num_layers=5, num_heads=8, head_dim=8)
    drawn = random_selection(layout, 6, seed=3)
    assert len(set(drawn.ranking)) == 6 and all(0 <= lay < 5 and 0 <= h < 8 for lay, h in drawn.ranking)
    assert drawn.ranking == random_selection(layout, 6, seed=3).ranking
    assert drawn.ranking != random_selection(layout, 6, seed=4).ranking
    assert drawn.scores is None and drawn.scales is None and drawn.history.steps == []
    counts = torch.zeros(40)
    for seed in range(400):
        for layer, head in random_selection(layout, 4, seed).ranking:
            counts[layer * 8 + head] += 1
    assert counts.min() > 10 and counts.max() < 80, "every head is drawn about 40 times in 400 draws of 4"


def random_heads_run(stories_dir: Path, out: Path, seed: int) -> int:
    return train_main(["--model", str(stories_dir), "--task", "truthfulqa", "--heads", "4", "--random-heads",
                       "--seed", str(seed), "--out", str(out), "--epochs", "1", "--limit", "4", "--batch-size", "4",
                       "--no-mc-eval", "--no-progress"])


@pytest.mark.slow
def test_train_random_heads_skips_stage1_and_draws_seeded_heads(stories_dir, tmp_path, monkeypatch, capsys):
    def no_stage1(*_args, **_kwargs):
        raise AssertionError("stage 1 must not run with --random-heads")

    monkeypatch.setattr("lofit.train.pipeline.select_heads", no_stage1)
    runs = {}
    for label, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert random_heads_run(stories_dir, tmp_path / label, seed) == 0, capsys.readouterr().err
        runs[label] = load_adapter(tmp_path / label)
    first = runs["a"]
    assert first.num_heads == 4 and len(set(first.head_list())) == 4
    layout = HeadLayout(5, 8, 8)
    assert first.head_list() == sorted(random_selection(layout, 4, seed=3).ranking)
    assert runs["b"].content_sha256 == first.content_sha256, "same seed, same heads and offsets"
    assert runs["c"].head_list() != first.head_list(), "another seed draws other heads"
    selection = first.metadata["selection"]
    assert (selection["head_selection"], selection["seed"], selection["scores"]) == ("random", 3, None)
    assert first.metadata["hyperparameters"]["random_heads"] is True and first.scales is None
    report = json.loads((tmp_path / "a" / "train_report.json").read_text())
    assert report["stage1"]["steps"] == [] and len(report["stage2"]["steps"]) == 1


def test_train_random_heads_and_heads_from_are_exclusive(stories_dir, tmp_path, capsys):
    code = train_main(["--model", str(stories_dir), "--task", "truthfulqa", "--heads", "4", "--random-heads",
                       "--heads-from", str(tmp_path / "other"), "--out", str(tmp_path / "x"), "--no-progress"])
    assert code == 2
    assert capsys.readouterr().err == ("lofit-train: error: --random-heads and --heads-from both choose the heads; "
                                       "give at most one\n")
    assert not (tmp_path / "x").exists(), "nothing is written on error"
