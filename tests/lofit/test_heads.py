"""Base-model identity: what an adapter records, and a fingerprint that follows the weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lofit.heads import (
    HeadLayout,
    UnsupportedModelError,
    choose_k,
    identity_from_checkpoint,
    identity_from_model,
    layout_from_config,
)


def test_identity_of_the_stories_checkpoint(stories_identity):
    assert stories_identity.architecture == "LlamaForCausalLM"
    assert (stories_identity.num_hidden_layers, stories_identity.num_attention_heads,
            stories_identity.num_key_value_heads, stories_identity.head_dim,
            stories_identity.hidden_size) == (5, 8, 4, 8, 64)
    assert stories_identity.layout == HeadLayout(5, 8, 8)
    assert stories_identity.fingerprint.startswith("sha256:")


def test_model_and_checkpoint_fingerprints_agree(stories_model, stories_identity):
    assert identity_from_model(stories_model, "x").fingerprint == stories_identity.fingerprint
    assert layout_from_config(stories_model.config) == stories_identity.layout


def copy_with_o_proj_change(src: Path, dst: Path, layer: int) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    tensors[f"model.layers.{layer}.self_attn.o_proj.weight"][0, 0] += 1e-3
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_fingerprint_changes_when_o_proj_weights_change(stories_dir, stories_identity, tmp_path):
    changed = identity_from_checkpoint(copy_with_o_proj_change(stories_dir, tmp_path / "m", layer=4))
    assert changed.fingerprint != stories_identity.fingerprint
    assert changed.mismatches(stories_identity) == [
        f"fingerprint: adapter has {changed.fingerprint!r}, model has {stories_identity.fingerprint!r}"]


def test_fingerprint_ignores_the_load_dtype_of_exact_weights(stories_dir, stories_identity):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float64)
    assert identity_from_model(model, "x").fingerprint == stories_identity.fingerprint


def without_o_proj(stories_dir: Path, directory: Path, layer: int) -> Path:
    """A copy of the stories checkpoint in ``directory`` without layer ``layer``'s o_proj weight."""
    shutil.copytree(stories_dir, directory)
    tensors = load_file(str(directory / "model.safetensors"))
    tensors.pop(f"model.layers.{layer}.self_attn.o_proj.weight")
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def test_checkpoint_without_o_proj_is_refused(stories_dir, tmp_path):
    dst = without_o_proj(stories_dir, tmp_path / "m", 2)
    with pytest.raises(UnsupportedModelError, match="o_proj"):
        identity_from_checkpoint(dst)


def test_k_is_a_count_or_a_rounded_percentage_of_all_heads():
    assert choose_k(270, 8, None) == 8
    assert choose_k(270, None, 3) == 8 and choose_k(270, None, 10) == 27  # the paper's 3 % and 10 %
    assert choose_k(270, None, 0.1) == 1  # at least one head


@pytest.mark.parametrize(("heads", "percent", "message"), [
    (None, None, "exactly one"), (8, 3, "exactly one"), (0, None, "at least 1"), (None, 0, r"\(0, 100\]"),
    (None, 101, r"\(0, 100\]"), (271, None, "exceeds the model's 270 heads")])
def test_bad_head_counts_are_refused(heads, percent, message):
    with pytest.raises(ValueError, match=message):
        choose_k(270, heads, percent)


def test_the_text_decoders_projections_are_found_by_name_never_a_towers():
    from lofit.heads import projection_keys

    text = [f"model.language_model.layers.{i}.self_attn.o_proj.weight" for i in range(2)]
    tower = [f"model.vision_tower.vision_model.encoder.layers.{i}.self_attn.out_proj.weight" for i in range(2)]
    other = ["model.language_model.layers.0.mlp.down_proj.weight", "lm_head.weight"]
    assert projection_keys(tower + other + text, 2) == text
    gpt_oss = [f"model.layers.{i}.attn.o_proj.weight" for i in range(3)]
    assert projection_keys(gpt_oss, 3) == gpt_oss, "a block named attn instead of self_attn"
    with pytest.raises(UnsupportedModelError, match=r"tensor model.language_model.layers.2.self_attn.o_proj.weight "
                                                    "not found"):
        projection_keys(text, 3)
    with pytest.raises(UnsupportedModelError, match="cannot tell the decoder's attention output projections"):
        projection_keys(text + [f"decoder.layers.{i}.self_attn.o_proj.weight" for i in range(2)], 2)
    with pytest.raises(UnsupportedModelError, match=r"found: none"):
        projection_keys(tower, 2)


def test_a_multimodal_config_is_read_through_its_text_config():
    from lofit.heads import text_config

    config = {"architectures": ["Gemma3ForConditionalGeneration"], "vision_config": {"hidden_size": 8},
              "text_config": {"num_hidden_layers": 4, "num_attention_heads": 8, "head_dim": 32, "hidden_size": 96,
                              "vocab_size": 100}}
    assert layout_from_config(config) == HeadLayout(4, 8, 32)
    assert text_config(config)["architectures"] == ["Gemma3ForConditionalGeneration"]
    assert text_config({"num_hidden_layers": 2}) == {"num_hidden_layers": 2}
    mla = {"num_hidden_layers": 2, "num_attention_heads": 16, "hidden_size": 896, "qk_nope_head_dim": 128,
           "qk_rope_head_dim": 64, "v_head_dim": 128}
    assert layout_from_config(mla).head_dim == 128, "MLA: the value head size feeds o_proj"


def test_a_checkpoint_is_checked_from_its_config_and_tensor_names(stories_dir, tmp_path):
    from lofit.heads import check_checkpoint

    check_checkpoint(stories_dir)
    dst = without_o_proj(stories_dir, tmp_path / "m", 4)
    with pytest.raises(UnsupportedModelError, match="tensor model.layers.4.self_attn.o_proj.weight not found"):
        check_checkpoint(dst)
