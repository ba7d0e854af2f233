"""``bench/gpu_gather_add.py``: its op is the plugin's gather-add, and the script runs on CPU at small shapes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.gpu_gather_add", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=600)


def test_gather_add_is_the_banks_apply(stories_identity):
    from bench.gpu_gather_add import addmm_fold, gather_add
    from lofit.adapter import LofitAdapter
    from lofit.vllm.bank import AdapterBank

    layout = stories_identity.layout
    bank = AdapterBank(stories_identity, capacity=4, max_num_tokens=8)
    gen = torch.Generator().manual_seed(0)
    heads = torch.tensor([[0, 0], [layout.num_layers - 1, layout.num_heads - 1]])
    bank.load(LofitAdapter(heads=heads, offsets=torch.randn(2, layout.head_dim, generator=gen),
                           base_model=stories_identity, name="a"))
    row, _ = bank.acquire({"a": 1.0})
    bank.fill_token_rows([row, 0], [3, 2])
    x = torch.randn(5, layout.num_heads * layout.head_dim, generator=gen)
    for layer in range(layout.num_layers):
        assert torch.equal(gather_add(bank.tables, layer, bank.token_rows, x), bank.apply(layer, x))
    wo = torch.randn(7, x.shape[1], generator=gen)
    folded = bank.tables @ wo.t()
    torch.testing.assert_close(addmm_fold(folded, 0, bank.token_rows, x, wo), bank.apply(0, x) @ wo.t())


@pytest.mark.slow
def test_runs_on_cpu(tmp_path):
    out = tmp_path / "gather.json"
    proc = run("--device", "cpu", "--iters", "2", "--repeats", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "overhead" in proc.stdout and "goal <= 1%" in proc.stdout
    result = json.loads(out.read_text())
    assert {(r["kind"], r["steered"]) for r in result["results"]} == {("decode", 1.0), ("decode", 0.0),
                                                                      ("prefill", 1.0), ("prefill", 0.0)}
    assert all(r["ms"]["attention block + o_proj"] > 0 for r in result["results"])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_agree_in_the_interpreter():
    proc = run("--device", "cpu", "--triton", "--check-only", "--dtype", "float32", env={"TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("triton fold") == 4, proc.stdout
