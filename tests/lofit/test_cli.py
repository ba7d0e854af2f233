"""``lofit-train`` end to end, as a user runs it: a real process on the real stories260K model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lofit.adapter import load_adapter
from lofit.heads import identity_from_checkpoint
from lofit.train.cli import main

pytestmark = pytest.mark.slow  # CLI subprocesses / servers: not part of the fast inner loop

LOFIT_TRAIN = Path(sys.executable).with_name("lofit-train")


def run_train(*args: str) -> subprocess.CompletedProcess:
    command = [str(LOFIT_TRAIN)] if LOFIT_TRAIN.exists() else [sys.executable, "-m", "lofit.train.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, stories_dir: Path) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("cli") / "tqa-adapter"
    result = run_train("--model", str(stories_dir), "--task", "truthfulqa", "--heads", "4", "--out", str(out),
                       "--epochs", "1", "--limit", "16", "--batch-size", "4", "--seed", "7", "--no-progress")
    return out, result


def test_cli_writes_a_valid_adapter_for_the_base_model(trained, stories_dir):
    out, result = trained
    assert result.returncode == 0, result.stderr
    adapter = load_adapter(out, expect_base=identity_from_checkpoint(stories_dir))
    assert adapter.num_heads == 4 and adapter.task == "truthfulqa" and adapter.name == "tqa-adapter"
    assert adapter.scales is not None and adapter.scales.shape == (4, 8)
    summary = json.loads(result.stdout)
    assert summary["content_sha256"] == adapter.content_sha256
    assert [tuple(h) for h in summary["heads"]] == adapter.head_list()


def test_cli_records_hyperparameters_data_and_metrics(trained):
    out, _ = trained
    config = json.loads((out / "adapter_config.json").read_text())
    hp = config["hyperparameters"]
    assert (hp["lr_a"], hp["l1"], hp["lr_v"], hp["beta"], hp["seed"], hp["heads"]) == (5e-3, 5e-4, 1e-2, 0.5, 7, 4)
    assert config["data"]["task"] == "truthfulqa" and config["data"]["fold"] == 0
    assert config["data"]["train_examples"] == 16 and config["data"]["files"][0]["sha256"]
    metrics = config["metrics"]
    assert metrics["stage2_val_before"]["loss"] == pytest.approx(0.6931, abs=1e-3), "policy == reference"
    assert set(metrics["truthfulqa_mc"]["after"]) == {"mc1", "mc2", "questions"}
    assert len(config["selection"]["ranking"]) == 40


def test_cli_writes_the_head_map_and_the_report(trained):
    out, _ = trained
    assert (out / "heads.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "train_report.json").read_text())
    assert len(report["stage1"]["steps"]) == 4 and len(report["stage2"]["steps"]) == 4
    assert {"load", "stage1", "stage2", "total"} <= set(report["timings_seconds"])
    assert report["stage1"]["epochs"][0]["val_loss"] > 0


def test_cli_is_reproducible_with_a_seed(trained, stories_dir, tmp_path):
    out, _ = trained
    again = tmp_path / "again"
    result = run_train("--model", str(stories_dir), "--task", "truthfulqa", "--heads", "4", "--out", str(again),
                       "--epochs", "1", "--limit", "16", "--batch-size", "4", "--seed", "7", "--no-progress",
                       "--no-mc-eval")
    assert result.returncode == 0, result.stderr
    assert load_adapter(again).content_sha256 == load_adapter(out).content_sha256


def test_cli_sft_jsonl_with_a_config_file(stories_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "completion": " the end"})
                              for p in ["Once upon a time", "The dog", "A cat", "Tom said"]))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"task": "sft-jsonl", "heads_percent": 10, "epochs": 1, "lr_v": 0.05}))
    out = tmp_path / "sft"
    result = run_train("--config", str(config), "--model", str(stories_dir), "--data", str(data),
                       "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    adapter = load_adapter(out)
    assert adapter.num_heads == 4, "10 % of 40 heads"
    assert adapter.metadata["hyperparameters"]["lr_v"] == 0.05


@pytest.mark.parametrize(("args", "message"), [
    (["--task", "truthfulqa", "--heads", "4"], "missing required setting(s): --out"),
    (["--task", "truthfulqa", "--out", "X"], "exactly one of --heads K or --heads-percent P"),
    (["--task", "truthfulqa", "--heads", "41", "--out", "X", "--epochs", "1", "--limit", "2"],
     "exceeds the model's 40 heads"),
    (["--task", "clutrr", "--heads", "2", "--out", "X"], "non-commercial"),
    (["--task", "sft-jsonl", "--heads", "2", "--out", "X"], "needs --data"),
    (["--task", "truthfulqa", "--heads", "2", "--out", "X", "--lr-v", "-1"], "--lr-v must be a positive"),
    (["--task", "mquake", "--heads", "2", "--out", "X", "--fold", "1"], "--fold is only for tasks with folds"),
    (["--task", "truthfulqa", "--heads", "2", "--out", "X", "--val-data", "v.jsonl"],
     "--val-data is only for the jsonl tasks"),
    (["--task", "arc", "--heads", "2", "--out", "X", "--limit", "0"], "--limit must be at least 1"),
    (["--task", "arc", "--heads", "2", "--out", "X", "--limit", "-1"], "--limit must be at least 1"),
    (["--task", "sft-jsonl", "--heads", "2", "--out", "X", "--data", "."], "is a directory; a data file is needed"),
    (["--task", "truthfulqa", "--heads", "2", "--out", "X", "--epochs", "0"], "--epochs must be at least 1"),
    (["--task", "truthfulqa", "--heads", "2", "--out", "X", "--epochs", "1", "--limit", "4", "--lr-v", "1e38"],
     "stage 2: tune offsets: the optimiser step overflowed at step 1 (--lr-v 1e+38 is far too large)"),
    (["--task", "truthfulqa", "--heads", "2", "--out", "X", "--device", "mps"], "runs on cpu, cuda or cuda:N"),
    (["--task", "truthfulqa", "--heads", "2", "--out", "."], "give the path of the adapter directory"),
    (["--task", "truthfulqa", "--heads", "2", "--out", "X", "--heads-from", "nowhere"],
     "nowhere: adapter directory not found"),
])
def test_cli_bad_input_gets_a_clear_error(stories_dir, tmp_path, capsys, args, message):
    args = [a.replace("X", str(tmp_path / "x")) for a in args]
    assert main(["--model", str(stories_dir), *args, "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists(), "nothing is written on error"


def test_cli_never_replaces_what_is_not_an_adapter(stories_dir, tmp_path, capsys):
    """--out on a folder of other files, on the model or around the data: refused before training, all kept."""
    keep = tmp_path / "results"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    data = keep / "train.jsonl"
    data.write_text(json.dumps({"prompt": "Once", "completion": " upon"}) + "\n")
    run = ["--model", str(stories_dir), "--heads", "2", "--no-progress", "--epochs", "1"]
    assert main([*run, "--task", "truthfulqa", "--limit", "2", "--out", str(keep)]) == 2
    assert "not an adapter directory" in capsys.readouterr().err
    assert main([*run, "--task", "truthfulqa", "--limit", "2", "--out", str(stories_dir)]) == 2
    assert f"would replace --model {stories_dir}" in capsys.readouterr().err
    assert main([*run, "--task", "sft-jsonl", "--data", str(data), "--out", str(keep)]) == 2
    assert "would replace --data" in capsys.readouterr().err
    assert sorted(p.name for p in keep.iterdir()) == ["notes.txt", "train.jsonl"]
    assert (stories_dir / "model.safetensors").is_file()


def test_cli_data_and_weights_that_cannot_be_read(stories_dir, tmp_path, capsys):
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00 not text")
    assert main(["--model", str(stories_dir), "--task", "sft-jsonl", "--data", str(binary), "--heads", "2",
                 "--out", str(tmp_path / "x")]) == 2
    assert f"{binary}: not UTF-8 text" in capsys.readouterr().err
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"prompt": "Q", "chosen": "A", "rejected": "A"}) + "\n")
    assert main(["--model", str(stories_dir), "--task", "dpo-jsonl", "--data", str(same), "--heads", "2",
                 "--out", str(tmp_path / "x")]) == 2
    assert f"{same}:1: chosen and rejected are the same answer" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in stories_dir.iterdir():
        (broken / file.name).write_bytes(file.read_bytes()[:100] if file.name == "model.safetensors"
                                         else file.read_bytes())
    assert main(["--model", str(broken), "--task", "truthfulqa", "--heads", "2", "--out", str(tmp_path / "x")]) == 2
    assert f"--model {broken}: cannot read the checkpoint's weights" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_model_that_is_not_a_checkpoint(tmp_path, capsys):
    code = main(["--model", str(tmp_path), "--task", "truthfulqa", "--heads", "2", "--out", str(tmp_path / "x"),
                 "--no-progress"])
    assert code == 2 and "not a Hugging Face checkpoint directory" in capsys.readouterr().err


def test_cli_help_explains_every_flag():
    result = run_train("--help")
    assert result.returncode == 0
    for flag in ("--model", "--task", "--data", "--heads", "--heads-percent", "--out", "--seed", "--epochs",
                 "--lr-a", "--lr-v", "--l1", "--beta", "--batch-size", "--dtype", "--device", "--config",
                 "--fold", "--grad-accum"):
        assert flag in result.stdout


def test_cli_bfloat16_model_keeps_float32_offsets(stories_dir, tmp_path, capsys):
    out = tmp_path / "bf16"
    code = main(["--model", str(stories_dir), "--task", "mquake", "--heads", "2", "--out", str(out), "--epochs", "1",
                 "--limit", "4", "--dtype", "bfloat16", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    adapter = load_adapter(out)
    assert adapter.offsets.dtype == torch.float32 and torch.isfinite(adapter.offsets).all()
    assert adapter.metadata["hyperparameters"]["dtype"] == "bfloat16"


def test_cli_unsupported_architecture_names_the_supported_ones(tmp_path, capsys):
    from tokenizers import Tokenizer, models
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64)).save_pretrained(gpt2)
    vocab = {f"t{i}": i for i in range(64)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))
    tokenizer.save_pretrained(gpt2)
    code = main(["--model", str(gpt2), "--task", "truthfulqa", "--heads", "1", "--out", str(tmp_path / "x"),
                 "--limit", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "LlamaForCausalLM" in err and "Qwen2ForCausalLM" in err


def test_cli_heads_from_reuses_another_adapters_selection(trained, stories_dir, tmp_path):
    source, _ = trained
    out = tmp_path / "mquake-on-tqa-heads"
    result = run_train("--model", str(stories_dir), "--task", "mquake", "--heads", "3", "--heads-from", str(source),
                       "--out", str(out), "--epochs", "1", "--limit", "8", "--batch-size", "4", "--no-progress")
    assert result.returncode == 0, result.stderr
    adapter, original = load_adapter(out), load_adapter(source)
    ranking = [tuple(h) for h in original.metadata["selection"]["ranking"]]
    assert adapter.head_list() == sorted(ranking[:3])
    assert adapter.metadata["selection"]["reused_from"]["content_sha256"] == original.content_sha256
    assert adapter.metadata["selection"]["scores"] == original.metadata["selection"]["scores"]
    assert adapter.scales is None, "no stage-1 scales were learned in this run"
    report = json.loads((out / "train_report.json").read_text())
    assert report["stage1"]["steps"] == [] and len(report["stage2"]["steps"]) == 2
