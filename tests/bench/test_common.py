"""``bench/common.py``: client-side latency statistics, the hand-written LoRA adapters, the tables."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest
import torch

from bench.common import (
    Stream,
    lora_bytes,
    make_lora_adapters,
    md_table,
    median_of,
    percentile,
    random_adapter,
    summarise,
    text_prompts,
    tree_memory,
)


def test_stream_latencies():
    stream = Stream(sent=10.0, chunks=[(10.5, 1), (10.7, 2), (11.0, 1)])
    assert stream.tokens == 4
    assert stream.ttft == pytest.approx(0.5)
    assert stream.itls() == pytest.approx([0.1, 0.1, 0.3])  # a 2-token chunk shares its gap
    result = summarise([stream, Stream(sent=10.0, chunks=[(10.1, 4)])], seconds=2.0)
    assert result["output_tokens"] == 8 and result["output_tokens_per_s"] == 4.0
    assert result["ttft_p50_ms"] == pytest.approx(300.0)


def test_median_of():
    assert median_of([{"a": 1.0, "b": None}, {"a": 3.0, "b": None}, {"a": 2.0, "b": None}]) == {"a": 2.0, "b": None}
    assert median_of([]) == {}


def test_percentile():
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))
    assert percentile(list(range(101)), 99) == pytest.approx(99.0)


def test_lora_adapters_are_peft_format(tmp_path, stories_dir):
    from safetensors.torch import load_file

    config = json.loads((stories_dir / "config.json").read_text())
    [path] = make_lora_adapters(stories_dir, 1, tmp_path, ["q_proj", "o_proj"], rank=4)
    peft = json.loads((tmp_path / "lora00" / "adapter_config.json").read_text())
    assert peft["peft_type"] == "LORA" and peft["r"] == 4 and peft["target_modules"] == ["q_proj", "o_proj"]
    tensors = load_file(f"{path}/adapter_model.safetensors")
    width = config["num_attention_heads"] * (config.get("head_dim") or config["hidden_size"]
                                             // config["num_attention_heads"])
    a = tensors["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight"]
    assert a.shape == (4, width) and b.shape == (config["hidden_size"], 4)
    assert len(tensors) == 2 * 2 * config["num_hidden_layers"]
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == lora_bytes(config, ["q_proj", "o_proj"],
                                                                                     4, 2)


def test_random_adapter_is_deterministic(stories_identity):
    a, b = random_adapter(stories_identity, 3, "x"), random_adapter(stories_identity, 3, "x")
    assert torch.equal(a.heads, b.heads) and torch.equal(a.offsets, b.offsets)
    assert a.num_heads == 8


def test_text_prompts_have_the_asked_length(prepared_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(prepared_model_dir)
    prompts = text_prompts(tokenizer, 4, 32, seed=0)
    assert len(set(prompts)) == 4
    for text in prompts:
        assert len(tokenizer.encode(text, add_special_tokens=False)) == 32


def test_md_table():
    assert md_table(["a", "b"], [["x", 1.234], ["y", None]]) == "| a | b |\n|---|---|\n| x | 1.2 |\n| y | — |"


def test_tree_memory_sums_a_process_tree_and_lists_each_process():
    """A child and its grandchild (which holds 64 MiB) are each counted once, with their names."""
    psutil = pytest.importorskip("psutil")
    grandchild = "import time; b = b'x' * (64 << 20); time.sleep(60)"
    child = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {grandchild!r}]); "
             "time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", child])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            kids = psutil.Process(proc.pid).children()
            if kids and kids[0].memory_info().rss > 64 << 20:
                break
            time.sleep(0.05)
        memory = tree_memory([proc.pid, proc.pid])
        assert memory["processes"] == 2 and len(memory["each"]) == 2
        assert all(p["name"].startswith("python") for p in memory["each"])
        assert max(p["rss_mib"] for p in memory["each"]) > 64
        assert memory["rss_mib"] == pytest.approx(sum(p["rss_mib"] for p in memory["each"]))
        assert memory["pss_mib"] == pytest.approx(sum(p["pss_mib"] for p in memory["each"]))
    finally:
        for kid in psutil.Process(proc.pid).children(recursive=True):
            kid.kill()
        proc.kill()
        proc.wait()
