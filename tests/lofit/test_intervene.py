"""The transformers reference path: the right columns, every position, per-row adapters."""

from __future__ import annotations

import pytest
import torch

from lofit.adapter import BaseModelMismatchError, LofitAdapter
from lofit.heads import BaseModelIdentity
from lofit.intervene import LofitHooks, apply_adapters, batch_offsets, combine, dense_table


def capture_o_proj_inputs(model) -> tuple[list[torch.Tensor], list]:
    """Record what each o_proj really receives (registered after LoFiT's hooks, so it sees the edit)."""
    seen: list[torch.Tensor] = []
    handles = [layer.self_attn.o_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
               for layer in model.model.layers]
    return seen, handles


def make_adapter(identity: BaseModelIdentity, heads: list[tuple[int, int]], seed: int,
                 scale: float = 0.5) -> LofitAdapter:
    return LofitAdapter.random(identity, f"a{seed}", heads, seed=seed, scale=scale)


def test_offsets_and_scales_touch_exactly_the_selected_columns(stories_model, stories_tokenizer):
    ids = torch.tensor([stories_tokenizer("Once upon a time there was a cat").input_ids])
    hooks = LofitHooks(stories_model)
    d = hooks.layout.head_dim
    layer, head = 2, 5
    scales = torch.zeros(5, 8, d)
    offsets = torch.zeros(5, 8, d)
    scales[layer, head] = torch.linspace(-0.5, 0.5, d)
    offsets[layer, head] = torch.arange(d, dtype=torch.float32)

    # The edit at one layer changes every later layer's input, so compare at the edited layer only: the
    # inputs of layers <= `layer` are computed before the edit can influence them.
    seen, handles = capture_o_proj_inputs(stories_model)
    stories_model(ids)
    plain = seen[layer]
    seen.clear()
    hooks.scales, hooks.offsets = scales, offsets
    stories_model(ids)
    steered = seen[layer]
    for handle in handles:
        handle.remove()
    hooks.remove()

    cols = slice(head * d, (head + 1) * d)
    expected = plain.clone()
    expected[..., cols] = (1 + scales[layer, head]) * plain[..., cols] + offsets[layer, head]
    torch.testing.assert_close(steered, expected)
    untouched = torch.ones(plain.shape[-1], dtype=torch.bool)
    untouched[cols] = False
    assert torch.equal(steered[..., untouched], plain[..., untouched])
    assert (steered[0, :, cols] - plain[0, :, cols]).abs().sum(-1).gt(0).all(), "every position is edited"
    for earlier in range(layer):
        assert torch.equal(seen[earlier], capture_plain_layer(stories_model, ids, earlier))


def capture_plain_layer(model, ids, layer: int) -> torch.Tensor:
    seen, handles = capture_o_proj_inputs(model)
    model(ids)
    for handle in handles:
        handle.remove()
    return seen[layer]


def test_removed_hooks_leave_the_model_unchanged(stories_model, stories_tokenizer):
    ids = torch.tensor([stories_tokenizer("The little dog").input_ids])
    before = stories_model(ids).logits
    with LofitHooks(stories_model) as hooks:
        hooks.offsets = torch.ones(5, 8, 8)
        assert not torch.allclose(stories_model(ids).logits, before)
    torch.testing.assert_close(stories_model(ids).logits, before, rtol=0, atol=0)


def test_per_row_adapters_equal_each_row_run_alone(stories_model, stories_tokenizer, stories_identity):
    a = make_adapter(stories_identity, [(0, 1), (3, 4), (4, 7)], seed=1)
    b = make_adapter(stories_identity, [(1, 0), (1, 2), (2, 6)], seed=2)
    prompts = ["Once upon a time", "The little dog ran to the park", "Tom and Lily"]
    rows = [a, None, b]
    encoded = [stories_tokenizer(p).input_ids for p in prompts]
    width = max(map(len, encoded))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(encoded):  # right padding: real tokens never attend to pads
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    with apply_adapters(stories_model, rows):
        batched = stories_model(input_ids=ids, attention_mask=mask).logits
    for i, (seq, adapter) in enumerate(zip(encoded, rows, strict=True)):
        alone_ids = torch.tensor([seq])
        if adapter is None:
            alone = stories_model(alone_ids).logits
        else:
            with apply_adapters(stories_model, adapter):
                alone = stories_model(alone_ids).logits
        torch.testing.assert_close(batched[i, : len(seq)], alone[0], rtol=1e-4, atol=1e-4)
    plain = stories_model(torch.tensor([encoded[0]])).logits
    assert not torch.allclose(batched[0, : len(encoded[0])], plain[0], atol=1e-3), "adapter a must steer"


def test_strength_scales_the_offsets(stories_model, stories_tokenizer, stories_identity):
    adapter = make_adapter(stories_identity, [(2, 3)], seed=3)
    ids = torch.tensor([stories_tokenizer("A big bear").input_ids])
    double = LofitAdapter(heads=adapter.heads, offsets=adapter.offsets * 2, base_model=stories_identity,
                          name="double")
    with apply_adapters(stories_model, adapter, strengths=[2.0]):
        scaled = stories_model(ids).logits
    with apply_adapters(stories_model, double):
        expected = stories_model(ids).logits
    torch.testing.assert_close(scaled, expected)


def test_dense_tables_place_each_offset_at_its_head(stories_identity):
    adapter = make_adapter(stories_identity, [(0, 7), (4, 0)], seed=4)
    table = adapter.dense_offsets()
    assert table.shape == (5, 8, 8)
    assert torch.equal(table[0, 7], adapter.offsets[0]) and torch.equal(table[4, 0], adapter.offsets[1])
    assert int((table.abs().sum(-1) > 0).sum()) == 2
    assert torch.equal(dense_table(adapter.heads, adapter.offsets, stories_identity.layout), table)
    rows = batch_offsets([None, adapter], stories_identity.layout, strengths=[1.0, -1.0])
    assert torch.equal(rows[0], torch.zeros_like(table)) and torch.equal(rows[1], -table)


def test_adapter_from_another_model_is_refused(stories_model, stories_identity):
    other = BaseModelIdentity(**{**stories_identity.to_dict(), "fingerprint": "sha256:" + "0" * 64})
    adapter = make_adapter(other, [(0, 0)], seed=5)
    with pytest.raises(BaseModelMismatchError, match="fingerprint"), apply_adapters(stories_model, adapter):
        pass


def test_per_row_offsets_must_match_the_batch(stories_model, stories_tokenizer):
    ids = torch.tensor([stories_tokenizer("The cat").input_ids] * 2)
    with LofitHooks(stories_model) as hooks:
        hooks.offsets = torch.zeros(3, 5, 8, 8)
        with pytest.raises(ValueError, match="3 rows"):
            stories_model(ids)


def test_combine_is_the_weighted_sum_over_the_union_of_heads(stories_identity):
    a = LofitAdapter(heads=torch.tensor([(0, 1), (2, 3)]), offsets=torch.ones(2, 8), base_model=stories_identity,
                     name="a")
    b = LofitAdapter(heads=torch.tensor([(2, 3), (4, 0)]), offsets=2 * torch.ones(2, 8),
                     base_model=stories_identity, name="b")
    mix = combine([(a, 0.5), (b, -1.0)])
    assert mix.heads.tolist() == [[0, 1], [2, 3], [4, 0]]
    torch.testing.assert_close(mix.dense_offsets(), 0.5 * a.dense_offsets() - b.dense_offsets())
    other = BaseModelIdentity(**{**stories_identity.to_dict(), "fingerprint": "sha256:" + "4" * 64})
    with pytest.raises(BaseModelMismatchError):
        combine([(a, 1.0), (LofitAdapter(heads=torch.tensor([(0, 0)]), offsets=torch.ones(1, 8),
                                         base_model=other, name="c"), 1.0)])
