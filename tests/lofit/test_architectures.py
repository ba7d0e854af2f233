"""The reference path on every supported family: Llama, Mistral and Qwen2 (small random checkpoints)."""

from __future__ import annotations

import pytest
import torch

from lofit.adapter import LofitAdapter
from lofit.heads import identity_from_checkpoint, identity_from_model
from lofit.intervene import apply_adapters

FAMILIES = {
    "LlamaForCausalLM": ("LlamaConfig", "LlamaForCausalLM"),
    "MistralForCausalLM": ("MistralConfig", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("Qwen2Config", "Qwen2ForCausalLM"),
}


@pytest.fixture(params=sorted(FAMILIES))
def checkpoint(request, tmp_path):
    import transformers

    config_cls, model_cls = (getattr(transformers, name) for name in FAMILIES[request.param])
    config = config_cls(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    torch.manual_seed(0)
    model = model_cls(config).eval()
    model.save_pretrained(tmp_path / request.param)
    return request.param, tmp_path / request.param, model


def test_offsets_land_on_the_head_columns_of_o_proj(checkpoint):
    architecture, path, model = checkpoint
    identity = identity_from_checkpoint(path)
    assert identity.architecture == architecture and identity.head_dim == 32
    assert identity_from_model(model, "m").fingerprint == identity.fingerprint
    layer, head = 1, 2
    adapter = LofitAdapter(heads=torch.tensor([[layer, head]]), offsets=torch.linspace(-1, 1, 32)[None],
                           base_model=identity, name="x")
    seen: list[torch.Tensor] = []
    # A forward hook sees the input after every pre-hook (LoFiT's included) has edited it.
    handle = model.model.layers[layer].self_attn.o_proj.register_forward_hook(
        lambda _m, args, _out: seen.append(args[0].clone()))
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids)
        with apply_adapters(model, adapter):
            model(ids)
    handle.remove()
    plain, steered = seen
    delta = steered - plain
    cols = slice(head * 32, (head + 1) * 32)
    torch.testing.assert_close(delta[..., cols], adapter.offsets.expand(2, 7, 32))
    delta[..., cols] = 0
    assert torch.count_nonzero(delta) == 0, "no other column changes"
