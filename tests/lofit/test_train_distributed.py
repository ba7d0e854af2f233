"""Distributed ``lofit-train`` as users launch it: ``torchrun`` and ``accelerate launch`` with 2 CPU ranks (gloo).

Each equivalence compares against a single process with the same global batch (``--grad-accum`` x 2), which
the distributed run must reproduce bit for bit (same content hash), and against one process with the whole
batch in one micro-batch, within float rounding."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lofit.adapter import load_adapter
from lofit.train.config import ConfigError, TrainConfig
from lofit.train.distributed import Distributed, resolve_mode
from lofit.train.objective import Objective

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def train(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "lofit-train"), *args], capture_output=True, text=True, env=ONE_THREAD,
                          timeout=timeout, cwd=REPO)


def torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "lofit.train.cli",
                           *args], capture_output=True, text=True, env=ONE_THREAD, timeout=timeout, cwd=REPO)


def report(out: Path) -> dict:
    return json.loads((out / "train_report.json").read_text())


# -- launcher detection and work sharing (fast) -------------------------------------------------------------------
@pytest.mark.parametrize(("requested", "env", "mode"), [
    (None, {}, "none"),
    (None, {"RANK": "0", "WORLD_SIZE": "1"}, "none"),
    (None, {"RANK": "1", "WORLD_SIZE": "2"}, "ddp"),
    (None, {"RANK": "0", "WORLD_SIZE": "8", "ACCELERATE_USE_FSDP": "true"}, "fsdp"),
    ("fsdp", {"RANK": "0", "WORLD_SIZE": "2"}, "fsdp"),
    ("ddp", {"RANK": "0", "WORLD_SIZE": "1"}, "ddp"),
])
def test_the_mode_comes_from_the_flag_or_the_launcher(requested, env, mode):
    assert resolve_mode(requested, env) == mode


@pytest.mark.parametrize(("requested", "env", "message"), [
    ("ddp", {}, "needs a launcher"),
    ("none", {"RANK": "0", "WORLD_SIZE": "2"}, "each would train alone"),
    (None, {"RANK": "0", "WORLD_SIZE": "two"}, "not a number"),
])
def test_impossible_modes_are_refused(requested, env, message):
    with pytest.raises(ConfigError, match=message):
        resolve_mode(requested, env)


def test_micro_batches_are_dealt_round_robin_and_fsdp_ranks_stay_in_step():
    chunks = [[0, 1], [2, 3], [4, 5], [6, 7], [8]]
    share = lambda mode, rank: Objective(None, "sft", 0, 0.5, "cpu", Distributed(mode, rank, 2)).share(chunks)  # noqa: E731
    assert share("ddp", 0) == [([0, 1], 1.0), ([4, 5], 1.0), ([8], 1.0)]
    assert share("ddp", 1) == [([2, 3], 1.0), ([6, 7], 1.0)]
    assert share("fsdp", 1) == [([2, 3], 1.0), ([6, 7], 1.0), ([0, 1], 0.0)], "a weight-0 repeat keeps FSDP in step"
    assert Objective(None, "sft", 0, 0.5, "cpu").share(chunks) == [(c, 1.0) for c in chunks]


def test_leftover_launcher_variables_get_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ConfigError, match="MASTER_ADDR and MASTER_PORT not: start the ranks with torchrun"):
        Distributed.start("ddp", "cpu")


def test_precision_and_device_settings_are_checked(monkeypatch):
    base = dict(model="m", task="truthfulqa", out="o", heads=2)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ConfigError, match="fp16"):
        TrainConfig(**base).resolved()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert TrainConfig(**base).resolved().mixed_precision == "bf16"
    assert TrainConfig(**base, mixed_precision="no").resolved().mixed_precision == "no", "the flag wins"
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    assert TrainConfig(**base).resolved().gradient_checkpointing
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sees no CUDA device"):
            Distributed.start("none", "cuda")


# -- real launches (slow) -----------------------------------------------------------------------------------------
STORIES_RUN = ["--task", "truthfulqa", "--heads", "4", "--epochs", "2", "--limit", "24", "--seed", "7",
               "--no-progress", "--no-mc-eval"]


@pytest.mark.slow
def test_ddp_on_two_ranks_equals_one_process_on_the_same_global_batch(stories_dir, tmp_path):
    run = [*STORIES_RUN, "--model", str(stories_dir)]
    ddp = torchrun(*run, "--batch-size", "4", "--out", str(tmp_path / "ddp"))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    accumulated = train(*run, "--batch-size", "4", "--grad-accum", "2", "--out", str(tmp_path / "accum"))
    whole = train(*run, "--batch-size", "8", "--out", str(tmp_path / "whole"))
    assert accumulated.returncode == 0 and whole.returncode == 0, accumulated.stderr + whole.stderr

    adapters = {name: load_adapter(tmp_path / name) for name in ("ddp", "accum", "whole")}
    assert adapters["ddp"].content_sha256 == adapters["accum"].content_sha256, "bit for bit"
    for name in ("accum", "whole"):
        assert adapters["ddp"].head_list() == adapters[name].head_list()
        assert adapters["ddp"].metadata["selection"]["ranking"] == adapters[name].metadata["selection"]["ranking"]
    assert (adapters["ddp"].offsets - adapters["whole"].offsets).abs().max() < 1e-6
    assert (adapters["ddp"].scales - adapters["whole"].scales).abs().max() < 1e-6
    assert ddp.stdout.count('"content_sha256"') == 1, "rank 0 alone prints the summary"
    placement = report(tmp_path / "ddp")["placement"]
    assert placement["mode"] == "ddp" and placement["world_size"] == 2
    assert adapters["ddp"].metadata["hyperparameters"]["world_size"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accum", "ddp", "whole"], "no staging left behind"


@pytest.mark.slow
def test_fsdp_shards_the_base_over_two_ranks_and_trains_the_same_adapter(prepared_model_dir, tmp_path):
    run = ["--model", str(prepared_model_dir), "--task", "truthfulqa", "--heads-percent", "3", "--epochs", "1",
           "--limit", "8", "--seed", "7", "--no-progress", "--no-mc-eval", "--max-len", "96",
           "--max-prompt-len", "48", "--batch-size", "2"]
    fsdp = torchrun(*run, "--distributed", "fsdp", "--out", str(tmp_path / "fsdp"))
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    single = train(*run, "--grad-accum", "2", "--out", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr[-3000:]
    assert load_adapter(tmp_path / "fsdp").content_sha256 == load_adapter(tmp_path / "single").content_sha256
    placement = report(tmp_path / "fsdp")["placement"]
    total, per_rank = placement["base_parameter_bytes"], placement["base_parameter_bytes_per_rank"]
    assert placement["mode"] == "fsdp" and len(per_rank) == 2
    assert all(0.45 < b / total < 0.55 for b in per_rank), per_rank
    assert report(tmp_path / "single")["placement"]["base_parameter_bytes_per_rank"] == [total]


@pytest.mark.slow
@pytest.mark.parametrize(("config", "mode"), [("multi_gpu", "ddp"), ("fsdp", "fsdp")])
def test_accelerate_launch_with_the_shipped_configs(stories_dir, tmp_path, config, mode):
    """The configs in configs/accelerate/ as shipped, on 2 CPU processes; 5 examples in micro-batches of 2 leave
    rank 1 a step short, which FSDP covers with a weight-0 repeat."""
    run = [*STORIES_RUN[:-4], "--limit", "5", "--seed", "7", "--no-progress", "--no-mc-eval", "--batch-size", "2",
           "--model", str(stories_dir)]
    launched = subprocess.run([str(BIN / "accelerate"), "launch", "--config_file",
                               str(REPO / "configs" / "accelerate" / f"{config}.yaml"), "--num_processes", "2",
                               "--mixed_precision", "no", "--main_process_port", str(free_port()), "-m",
                               "lofit.train.cli", *run, "--out", str(tmp_path / "launched")],
                              capture_output=True, text=True, env=ONE_THREAD, timeout=600, cwd=REPO)
    assert launched.returncode == 0, launched.stderr[-3000:]
    single = train(*run, "--grad-accum", "2", "--out", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr
    assert load_adapter(tmp_path / "launched").content_sha256 == load_adapter(tmp_path / "single").content_sha256
    assert report(tmp_path / "launched")["placement"]["mode"] == mode


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_pids(parent: int) -> dict[int, int]:
    """``{rank: pid}`` of torchrun's workers, read from their environments."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = dict(item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item)
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if "TORCHELASTIC_RUN_ID" in env and int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            found[int(env["RANK"])] = int(entry.name)
    return found


@pytest.mark.slow
def test_a_rank_that_dies_ends_every_rank_and_nothing_is_written(stories_dir, tmp_path):
    out = tmp_path / "adapter"
    launcher = subprocess.Popen([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m",
                                 "lofit.train.cli", "--model", str(stories_dir), "--task", "truthfulqa", "--heads", "4",
                                 "--epochs", "1000", "--limit", "16", "--batch-size", "2", "--no-mc-eval",
                                 "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=ONE_THREAD, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while len(ranks := rank_pids(launcher.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(ranks) == 2, "torchrun started two ranks"
        time.sleep(8)  # into training
        os.kill(ranks[1], signal.SIGKILL)  # what the OOM killer does to one rank
        output, _ = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert launcher.returncode != 0
    assert "exitcode  : -9" in output and "rank      : 1" in output, output[-2000:]
    if "lofit-train: error:" in output:  # rank 0 may see the lost peer before torchrun stops it
        assert "lofit-train: error: lost contact with another rank" in output
    assert not any(pid_alive(pid) for pid in ranks.values()), "rank 0 was stopped too"
    assert list(tmp_path.iterdir()) == [], "no adapter and no staging folder"


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
def test_bad_input_ends_every_rank_with_one_clear_error(stories_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "Once", "completion": " upon"}\n{"prompt": "The dog"}\n')
    bad_data = torchrun("--model", str(stories_dir), "--task", "sft-jsonl", "--data", str(data), "--heads", "2",
                        "--out", str(tmp_path / "a"))
    assert bad_data.returncode != 0
    assert bad_data.stderr.count(f"lofit-train: error: {data}:2: needs string field(s) ['completion']") == 2
    blocker = tmp_path / "file"
    blocker.write_text("")
    unwritable = torchrun(*STORIES_RUN, "--model", str(stories_dir), "--out", str(blocker / "adapter"))
    assert unwritable.returncode != 0
    assert f"lofit-train: error: --out {blocker / 'adapter'}: {blocker} is a file" in unwritable.stderr
    assert "lofit-train: error: rank 0 failed: --out" in unwritable.stderr, "rank 1 hears of it"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "train.jsonl"]
