"""The memory part's measurements: the adapter bank's size per 100 adapters computed (next to LoRA weights), its
real tensor sizes in a plugin worker, and the plugin engine's RSS for 100 more adapters.
(Process-tree RSS itself is each target's ``memory()``.)"""

from __future__ import annotations

import json
from typing import Any

import torch

from bench.common import lora_bytes, make_adapters
from bench.serving.config import Config
from bench.serving.engine_target import EngineTarget, load_lofit_adapters
from lofit.vllm.contract import RPC_UNLOAD

LLAMA2_7B = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128,
             "hidden_size": 4096}


def bank_rows_computed(cfg: Config) -> list[list]:
    """MiB per 100 adapters: bank table rows (one per live adapter combination, model dtype) plus adapter
    content (K = 3 % of the heads: K x head_dim fp32 offsets + int64 head ids), next to rank-r LoRA weights."""
    config = json.loads((cfg.model / "config.json").read_text())
    width = torch.tensor([], dtype=getattr(torch, cfg.dtype)).element_size()
    rows = []
    for name, c in ((cfg.model.name, config), ("Llama-2-7B", LLAMA2_7B)):
        head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        heads = round(0.03 * c["num_hidden_layers"] * c["num_attention_heads"])  # K = 3 % of the heads
        table = 100 * c["num_hidden_layers"] * c["num_attention_heads"] * head_dim * width
        content = 100 * heads * (head_dim * 4 + 2 * 8)
        rows.append([name, "LoFiT bank rows (100 rows)", table / 2**20])
        rows.append([name, f"LoFiT adapter content (100 x {heads} heads = 3 %)", content / 2**20])
        for label, targets in (("o_proj", ["o_proj"]), ("q,k,v,o", ["q_proj", "k_proj", "v_proj", "o_proj"])):
            size = 100 * lora_bytes(c, targets, cfg.lora_rank, width)
            rows.append([name, f"LoRA r{cfg.lora_rank} {label} (100 adapters)", size / 2**20])
    return rows


def bank_stats(worker: Any) -> dict:
    """Runs inside a vLLM worker (sent by ``collective_rpc``, by reference: the worker imports this module):
    the LoFiT bank's real tensor sizes."""
    from lofit.vllm.bank import active_bank

    bank = active_bank()
    return {"capacity": bank.capacity, "layers": bank.tables.shape[0], "row_width": bank.tables.shape[2],
            "dtype": str(bank.tables.dtype), "tables_bytes": bank.tables.nbytes,
            "token_rows_bytes": bank.token_rows.nbytes, "adapters_loaded": len(bank.loaded())}


async def rss_for_100_loads(target: EngineTarget, cfg: Config) -> dict:
    """RSS of the plugin engine's processes before and after loading 100 more adapters (then unloaded)."""
    paths = make_adapters(cfg.model, 100, cfg.work / "extra", prefix="extra")
    before = target.memory()
    await load_lofit_adapters(target, paths)
    after = target.memory()
    for i in range(100):
        await target.engine.collective_rpc(RPC_UNLOAD, args=(f"extra{i:02d}",))
    return {"rss_before_mib": before["rss_mib"], "rss_after_mib": after["rss_mib"],
            "pss_before_mib": before["pss_mib"], "pss_after_mib": after["pss_mib"]}
