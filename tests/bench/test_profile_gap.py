"""``bench/profile_gap.py``: operators land in the right category and the shares add up (a real profile)."""

from __future__ import annotations

import torch

from bench.profile_gap import LOFIT_LABEL, category, summarise


def test_operator_names_map_to_categories():
    assert category("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert category("_C::cpu_attention_with_kv_cache") == "attention"
    assert category("_C::onednn_mm") == "GEMM (linear layers, lm_head)"
    assert category("aten::addmm") == "GEMM (linear layers, lm_head)"
    assert category(LOFIT_LABEL) == "LoFiT gather-add"
    assert category("aten::silu") == "other"


def test_summary_counts_the_gather_add_once_and_shares_sum_to_one():
    table, rows = torch.randn(16, 64), torch.randint(0, 16, (256,))
    x, w = torch.randn(256, 64), torch.randn(64, 64)
    q = torch.randn(1, 4, 64, 16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            with torch.profiler.record_function(LOFIT_LABEL):
                y = x + table.index_select(0, rows)
            y = y @ w
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
            torch.nn.functional.silu(y)
    result = summarise(prof, wall_s=2.0, tokens=10)
    share = result["share"]
    assert abs(sum(share.values()) - 1) < 1e-6
    assert all(value >= 0 for value in share.values())
    assert share["LoFiT gather-add"] > 0 and share["attention"] > 0 and share["GEMM (linear layers, lm_head)"] > 0
    assert result["output_tokens_per_s"] == 5.0
    assert {op["category"] for op in result["top_ops"]} >= {"attention", "GEMM (linear layers, lm_head)"}
