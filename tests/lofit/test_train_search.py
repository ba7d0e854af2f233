"""``lofit-train --search``, ``--select-epoch best`` and ``--pairs all`` (on the real stories260K model)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lofit.adapter import load_adapter
from lofit.hf import pad_token_id
from lofit.intervene import LofitHooks
from lofit.tasks import TaskError, load_task
from lofit.tasks.truthfulqa import TruthfulQAItem, to_pairs
from lofit.train.cli import main
from lofit.train.config import ConfigError, TrainConfig
from lofit.train.data import encode_examples
from lofit.train.objective import Objective
from lofit.train.search import candidates, parse_grid
from lofit.train.stage2 import tune_offsets
from lofit.train.validation import Score, best_index

STARTS = ["Once upon a time", "The little dog", "Tom and Lily", "One day, a bird", "The sun was", "A big bear",
          "She saw a", "The boy wanted", "There was a", "Mom said", "The cat", "Sam had a", "It was a",
          "Ben and Mia", "The tree", "A girl named"]


@pytest.fixture()
def planted(tmp_path: Path) -> tuple[Path, Path]:
    """Every story ends the same way: a task whose validation loss rewards a larger stage-2 step."""
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps({"prompt": s, "completion": " and they were happy"}) + "\n"
                             for s in STARTS[:12]))
    val.write_text("".join(json.dumps({"prompt": s, "completion": " and they were happy"}) + "\n"
                           for s in STARTS[12:]))
    return train, val


def test_the_search_writes_the_best_validation_candidate_and_runs_stage1_once_per_setting(
        stories_dir, planted, tmp_path, capsys):
    train, val = planted
    run = ["--model", str(stories_dir), "--task", "sft-jsonl", "--data", str(train), "--val-data", str(val),
           "--epochs", "2", "--heads", "4", "--no-progress"]
    assert main([*run, "--search", "lr_a=5e-3,1e-2", "lr_v=1e-4,5e-2", "heads=2,4",
                 "--out", str(tmp_path / "searched")]) == 0
    report = json.loads((tmp_path / "searched" / "search_report.json").read_text())
    assert report["metric"] == "val_loss" and report["grid_size"] == report["candidates"] == 8
    assert report["stage1_runs"] == 2, "stage 1 once per (lr_a, l1, ...), reused by K and lr_v"
    assert [r["stage1_reused"] for r in report["results"]] == [False, True, True, True] * 2
    losses = [r["score"]["value"] for r in report["results"]]
    assert report["winner"] == losses.index(min(losses))
    assert (tmp_path / "searched" / "search.png").read_bytes()[:4] == b"\x89PNG"

    winner = report["winner_settings"]
    capsys.readouterr()
    assert main([*run, "--lr-a", str(winner["lr_a"]), "--lr-v", str(winner["lr_v"]), "--heads", str(winner["heads"]),
                 "--out", str(tmp_path / "plain")]) == 0
    searched, plain = load_adapter(tmp_path / "searched"), load_adapter(tmp_path / "plain")
    assert searched.content_sha256 == plain.content_sha256, "the winner is the run its settings make"
    assert searched.metadata["search"]["winner_settings"] == winner
    assert searched.metadata["hyperparameters"]["lr_v"] == winner["lr_v"]


def test_a_search_with_select_epoch_best_scores_each_epoch_once_and_reports_the_kept_one(
        stories_dir, planted, tmp_path, monkeypatch):
    from lofit.train.validation import ValidationScorer

    calls = []
    real = ValidationScorer.score
    monkeypatch.setattr(ValidationScorer, "score", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    train, val = planted
    out = tmp_path / "best"
    assert main(["--model", str(stories_dir), "--task", "sft-jsonl", "--data", str(train), "--val-data", str(val),
                 "--epochs", "2", "--heads", "2", "--select-epoch", "best", "--search", "lr_v=1e-4,5e-2",
                 "--no-progress", "--out", str(out)]) == 0
    assert len(calls) == 2 * 2, "one validation pass per epoch; the kept epoch's score is not recomputed"
    report = json.loads((out / "search_report.json").read_text())
    epochs = json.loads((out / "train_report.json").read_text())["stage2"]["epochs"]
    winner = report["results"][report["winner"]]
    assert winner["score"]["value"] == epochs[winner["kept_epoch"] - 1]["val_metric_val_loss"]


def test_select_epoch_best_on_truthfulqa_reports_the_kept_epochs_mc_without_scoring_it_again(
        stories_dir, tmp_path, monkeypatch):
    import lofit.train.pipeline as pipeline

    applied = []
    real = pipeline.apply_adapters
    monkeypatch.setattr(pipeline, "apply_adapters", lambda *a, **k: applied.append(1) or real(*a, **k))
    out = tmp_path / "tqa"
    assert main(["--model", str(stories_dir), "--task", "truthfulqa", "--heads", "2", "--epochs", "2",
                 "--limit", "12", "--batch-size", "4", "--select-epoch", "best", "--no-progress",
                 "--out", str(out)]) == 0
    assert applied == [], "the closing val MC reuses the kept epoch's score"
    epochs = json.loads((out / "train_report.json").read_text())["stage2"]["epochs"]
    kept = json.loads((out / "train_report.json").read_text())["stage2"]["kept_epoch"]
    after = json.loads((out / "adapter_config.json").read_text())["metrics"]["truthfulqa_mc"]["after"]
    assert after["mc1"] == epochs[kept - 1]["val_metric_mc1"] and after["questions"] == 12
    assert 0.0 <= after["mc2"] <= 1.0


@pytest.mark.parametrize(("grid", "message"), [
    (["lr_v=abc"], "lr_v='abc' is not a number"),
    (["epochs_v=2.5"], "epochs_v='2.5' is not an integer"),
    (["max_len=64,128"], "'max_len' cannot be searched"),
    (["heads=2,4", "heads_percent=3"], "heads or heads_percent, not both"),
    (["lr_v=1e-2,1e-2"], "lists a value twice"),
    (["lr_v"], "write KEY=V1,V2"),
    (["lr_v=1e-2,-1"], "--lr-v must be a positive number"),
    (["heads=2,400"], ("--search candidate {'heads': 400}: ", "exceeds the model's 40 heads")),
])
def test_bad_search_settings_end_like_bad_flags(stories_dir, planted, tmp_path, capsys, grid, message):
    train, val = planted
    code = main(["--model", str(stories_dir), "--task", "sft-jsonl", "--data", str(train), "--val-data", str(val),
                 "--heads", "2", "--search", *grid, "--out", str(tmp_path / "x"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and all(m in err for m in (message if isinstance(message, tuple) else (message,)))
    assert err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("flags", "message"), [
    (["--select-epoch", "worst"], "argument --select-epoch: invalid choice: 'worst'"),
    (["--search-budget", "1.5"], "argument --search-budget: invalid int value: '1.5'"),
    (["--search"], "argument --search: expected at least one argument"),
])
def test_flags_argparse_refuses_end_in_one_line_too(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--model", "m", "--task", "sft-jsonl", "--out", "x", *flags])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.count("\n") == 1, err
    assert err.startswith("lofit-train: error: ") and "--help" in err


def test_a_diverging_candidate_is_recorded_and_the_search_goes_on(stories_dir, planted, tmp_path, capsys):
    train, val = planted
    run = ["--model", str(stories_dir), "--task", "sft-jsonl", "--data", str(train), "--val-data", str(val),
           "--epochs", "1", "--no-progress"]
    out = tmp_path / "searched"
    # K only in the grid (no --heads), and a budget above the grid's size: both accepted
    assert main([*run, "--search", "lr_v=1e-2,1e38", "heads=2", "--search-budget", "5", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "--search-budget 5 is not below the grid's size (2)" in captured.err
    assert "search candidate {'lr_v': 1e+38, 'heads': 2} diverged" in captured.err
    assert json.loads(captured.out)["search"]["winner_settings"] == {"lr_v": 1e-2, "heads": 2}
    report = json.loads((out / "search_report.json").read_text())
    ok, bad = report["results"]
    assert report["winner"] == 0 and ok["score"]["value"] is not None and "diverged" not in ok["score"]
    assert bad["score"]["value"] is None and sorted(bad["heads"]) == sorted(ok["heads"]), "same stage-1 ranking"
    assert "stage 2: tune offsets" in bad["score"]["diverged"] and "1e+38" in bad["score"]["diverged"]
    assert "nothing was written" not in bad["score"]["diverged"], "the search did write its winner"
    config = json.loads((out / "train_report.json").read_text())["config"]
    assert config["lr_v"] == 1e-2 and config["heads"] == 2
    assert config["search"] == {"lr_v": [1e-2, 1e38], "heads": [2]} and config["search_budget"] == 5

    assert main([*run, "--search", "lr_v=1e38,1e39", "heads=2", "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "every candidate diverged; nothing was written" in err and err.count("nothing was written") == 1
    assert err.count("\n") == 1 + 2, "a note per diverged candidate, then the error line"
    assert not (tmp_path / "none").exists()


def test_a_search_without_validation_data_is_refused(stories_dir, planted, tmp_path, capsys):
    train, _ = planted
    assert main(["--model", str(stories_dir), "--task", "sft-jsonl", "--data", str(train), "--heads", "2",
                 "--search", "lr_v=1e-2,5e-2", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "needs validation data" in capsys.readouterr().err


def test_the_budget_keeps_a_seeded_sample_in_grid_order():
    cfg = TrainConfig(model="m", task="truthfulqa", out="o", heads=2).resolved()
    grid = parse_grid(["lr_v=1e-3,1e-2,5e-2", "epochs_v=1,2,3"])
    every, total = candidates(cfg, grid, None)
    some, _ = candidates(cfg, grid, 4)
    assert total == len(every) == 9 and len(some) == 4
    order = [(c.lr_v, c.epochs_v) for c in every]
    picked = [(c.lr_v, c.epochs_v) for c in some]
    assert sorted(picked, key=order.index) == picked
    assert picked == [(c.lr_v, c.epochs_v) for c in candidates(cfg, grid, 4)[0]], "seeded"
    assert parse_grid({"lr_v": [0.01, 0.05], "heads": 8}) == {"lr_v": [0.01, 0.05], "heads": [8]}


def test_best_index_on_a_hand_made_history():
    losses = [Score("val_loss", v, False) for v in (3.0, 2.5, float("nan"), 2.5, 2.7)]
    assert best_index(losses) == 1, "lowest loss; the first of equals; NaN never wins"
    mc1 = [Score("mc1", v, True, tie) for v, tie in ((0.3, 0.5), (0.4, 0.5), (0.4, 0.6), (0.2, 0.9))]
    assert best_index(mc1) == 2, "MC2 breaks the MC1 tie"
    assert best_index([Score("mc1", math.nan, True)]) == 0
    flat = [Score("exact_match", 0.0, True)] * 3
    assert best_index(flat) == 0 and best_index(flat, prefer="last") == 2, "epochs keep the last of equals"


def test_select_epoch_best_keeps_that_epochs_offsets(stories_model, stories_tokenizer):
    from lofit.tasks import SFTExample

    examples = [SFTExample(s, " and they were happy") for s in STARTS[:8]]
    train = encode_examples(stories_tokenizer, examples, 128, 64)
    objective = Objective(stories_model, "sft", pad_token_id(stories_tokenizer), 0.5, "cpu")
    probe = torch.tensor([stories_tokenizer("Once upon a time").input_ids])
    seen, scripted = [], iter([1.0, 3.0, 2.0])

    def epoch_score() -> Score:  # the steered model's output now, and a scripted metric: epoch 2 is best
        seen.append(stories_model(probe).logits.detach().clone())
        return Score("made_up", next(scripted), True)

    tuned = tune_offsets(objective, LofitHooks(stories_model).layout, [(1, 2), (3, 5)], train, [], lr=5e-2,
                         epochs=3, init_std=1e-3, seed=0, batch_size=4, grad_accum=1, max_grad_norm=1.0,
                         progress=False, epoch_score=epoch_score)
    assert tuned.history.kept_epoch == 2 and tuned.history.kept_score == Score("made_up", 3.0, True)
    assert [e["val_metric_made_up"] for e in tuned.history.epochs] == [1.0, 3.0, 2.0]
    from lofit.intervene import dense_table

    hooks = LofitHooks(stories_model)
    hooks.offsets = dense_table(tuned.heads, tuned.offsets, hooks.layout)
    assert torch.allclose(stories_model(probe).logits, seen[1], atol=1e-6), "epoch 2's offsets were kept"
    assert not torch.allclose(seen[1], seen[2], atol=1e-4)
    hooks.remove()


def test_pairs_all_pairs_the_best_answer_with_every_distinct_incorrect_one():
    item = TruthfulQAItem("Can pigs fly?", "No", ["No", "No, they cannot"],
                          ["Yes", "Yes, with wings", "Yes", "No"])
    assert [(p.chosen, p.rejected) for p in to_pairs(item, "first")] == [("No", "Yes")]
    assert [(p.prompt, p.chosen, p.rejected) for p in to_pairs(item, "all")] == [
        ("Q: Can pigs fly? A:", "No", "Yes"), ("Q: Can pigs fly? A:", "No", "Yes, with wings")]
    first, every = load_task("truthfulqa"), load_task("truthfulqa", pairs="all")
    assert len(every.train) > 2 * len(first.train) and every.options["pairs"] == "all"
    with pytest.raises(TaskError, match="only truthfulqa has several incorrect answers"):
        load_task("mquake", pairs="all")
    with pytest.raises(ConfigError, match="only truthfulqa"):
        TrainConfig(model="m", task="mquake", out="o", heads=2, pairs="all").resolved()


@pytest.mark.parametrize(("settings", "message"), [
    ({"search_budget": "3"}, 'search_budget must be an integer or null, not "3"'),
    ({"search_budget": True}, "search_budget must be an integer or null, not true"),
    ({"heads": 2.5}, "heads must be an integer or null, not 2.5"),
    ({"lr_v": "0.1"}, 'lr_v must be a number or null, not "0.1"'),
    ({"search": 5}, "search must be a JSON object"),
    ({"search": "lr_v=1e-2,5e-2"}, "search must be a JSON object"),
    ({"search": {}}, "--search needs at least one KEY"),
    ({"search": {"lr_v": [True, 0.01]}}, "lr_v=True is not a number"),
    ({"search": {"epochs_v": [1.0, 2]}}, "epochs_v=1.0 is not an integer"),
])
def test_a_config_files_wrong_types_end_in_one_line(stories_dir, planted, tmp_path, capsys, settings, message):
    train, val = planted
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"heads": 2, **settings}))
    code = main(["--model", str(stories_dir), "--task", "sft-jsonl", "--data", str(train), "--val-data", str(val),
                 "--config", str(config), "--out", str(tmp_path / "x"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


def test_repeated_search_flags_add_up_and_grid_integers_are_strict():
    from lofit.train.cli import build_parser

    args = build_parser().parse_args(["--search", "lr_v=1e-2,5e-2", "--search", "heads=2,4"])
    assert parse_grid(args.search) == {"lr_v": [1e-2, 5e-2], "heads": [2, 4]}
    with pytest.raises(ConfigError, match="epochs_v='1e20' is not an integer"):
        parse_grid(["epochs_v=1e20"])


def test_a_huge_grid_needs_a_budget_and_samples_without_building_the_grid():
    cfg = TrainConfig(model="m", task="sft-jsonl", out="o", heads=2)
    grid = {key: [round(0.001 * (i + 1), 6) for i in range(60)] for key in ("lr_a", "lr_v", "l1", "beta")}
    with pytest.raises(ConfigError, match="12,960,000 candidates; give --search-budget"):
        candidates(cfg, grid, None)
    runs, total = candidates(cfg, grid, 3)
    assert total == 60 ** 4 and len(runs) == 3
    small = {"lr_v": [0.01, 0.05, 0.1], "heads": [2, 4]}  # the same order as itertools.product
    import itertools
    assert [(r.lr_v, r.heads) for r in candidates(cfg, small, None)[0]] == list(itertools.product(*small.values()))


@pytest.mark.parametrize("how", [["--random-heads"], ["--heads-from", "somewhere"]])
def test_searching_stage1_settings_where_stage1_does_not_run_is_refused(how):
    cfg = TrainConfig(model="m", task="sft-jsonl", out="o", heads=2, random_heads="--random-heads" in how,
                      heads_from=how[-1] if "--heads-from" in how else None)
    with pytest.raises(ConfigError, match="lr_a: stage 1 does not run"):
        candidates(cfg, {"lr_a": [1e-3, 5e-3], "lr_v": [1e-2]}, None)
