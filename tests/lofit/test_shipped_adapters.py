"""Every adapter shipped in adapters/ is valid for the default model and steers it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lofit.adapter import load_adapter
from lofit.default_model import default_model_dir
from lofit.heads import identity_from_checkpoint
from lofit.intervene import apply_adapters

ADAPTERS = sorted(p for p in (Path(__file__).resolve().parents[2] / "adapters").iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def default_model(prepared_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path), identity_from_checkpoint(path)


def test_adapters_are_shipped():
    assert [p.name for p in ADAPTERS] == ["mquake", "truthfulqa"]
    listed = (ADAPTERS[0].parent / "README.md").read_text()
    assert all(f"| `{p.name}` |" in listed for p in ADAPTERS), "every shipped adapter is listed with its command"


@pytest.mark.parametrize("directory", ADAPTERS, ids=lambda p: p.name)
def test_shipped_adapter_is_valid_for_the_default_model_and_steers_it(directory, default_model):
    model, tokenizer, identity = default_model
    adapter = load_adapter(directory, expect_base=identity)
    assert adapter.name == directory.name
    assert (directory / "heads.png").read_bytes()[:4] == b"\x89PNG"
    assert (directory / "train_report.json").is_file()
    percent = adapter.metadata["hyperparameters"]["heads_percent"]
    assert percent in (3.0, 10.0)
    assert adapter.num_heads == round(percent / 100 * identity.num_hidden_layers * identity.num_attention_heads)
    ids = tokenizer("Q: Can pigs fly? A:", return_tensors="pt").input_ids
    with torch.no_grad():
        plain = model(ids).logits[0, -1]
        with apply_adapters(model, adapter):
            steered = model(ids).logits[0, -1]
    assert (steered - plain).abs().max() > 0.1
