"""``bench/gpu_check.py`` (``scripts/gpu-check.sh``): its checks run the real bank, and pass on CPU eagerly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_gpu_check_runs_its_checks_eagerly_on_cpu(tmp_path):
    out = tmp_path / "results.json"
    run = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--out", str(out)],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    checks = {c["check"]: c for c in report["checks"]}
    assert len(checks) == 7 and all(c["ok"] for c in checks.values())
    assert checks["V2 eager (smoke): a reloaded adapter's new row"]["max_abs_diff"] == 0.0
    assert "| steered slots differ from unsteered ones | PASS |" in run.stdout


def test_the_gpu_check_refuses_cuda_without_a_device():
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    run = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cuda"], capture_output=True,
                         text=True, cwd=REPO, timeout=300)
    assert run.returncode == 2 and "torch sees no CUDA device" in run.stderr
