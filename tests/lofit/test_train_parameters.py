"""The trainer's LoFiT module: the same edit as the inference oracle, gradients only where heads are selected,
and step losses normalised over the whole step (accumulation = one big batch)."""

from __future__ import annotations

import pytest
import torch

from lofit.hf import pad_token_id
from lofit.intervene import LofitHooks, dense_table
from lofit.tasks import SFTExample
from lofit.train.data import encode_examples
from lofit.train.objective import Objective
from lofit.train.parameters import LofitParameters
from lofit.train.stage2 import tune_offsets

PROMPTS = ["Once upon a time", "The little dog ran to the", "Tom and Lily", "One day, a bird flew",
           "The sun was", "A big bear sat under a tree and", "She saw a", "The boy wanted"]


def test_the_module_steers_exactly_as_the_reference_hooks(stories_model, stories_tokenizer):
    ids = torch.tensor([stories_tokenizer("Once upon a time there was a cat").input_ids])
    gen = torch.Generator().manual_seed(0)
    scales = torch.randn(5, 8, 8, generator=gen) * 0.3
    heads = torch.tensor([[0, 3], [2, 5], [2, 1], [4, 7]])
    offsets = torch.randn(4, 8, generator=gen)
    hooks = LofitHooks(stories_model)
    layout = hooks.layout
    hooks.scales = scales
    expected_scaled = stories_model(ids).logits
    hooks.scales, hooks.offsets = None, dense_table(heads, offsets, layout)
    expected_offset = stories_model(ids).logits
    hooks.remove()

    with LofitParameters(layout, scales=scales).attach(stories_model):
        assert torch.equal(stories_model(ids).logits, expected_scaled)
    with LofitParameters(layout, heads=heads, offsets=offsets).attach(stories_model):
        assert torch.equal(stories_model(ids).logits, expected_offset)
    unsteered = stories_model(ids).logits
    assert not torch.allclose(unsteered, expected_offset), "detach() removed the edit"


def test_gradients_reach_only_the_selected_offsets_and_stay_float32(stories_model, stories_tokenizer):
    ids = torch.tensor([stories_tokenizer("The dog ran home").input_ids])
    heads = torch.tensor([[1, 2], [3, 6]])
    lofit = LofitParameters(LofitHooks(stories_model).layout, heads=heads, offsets=torch.zeros(2, 8))
    stories_model.to(torch.bfloat16)
    with lofit.attach(stories_model):
        stories_model(ids).logits.float().logsumexp(-1).sum().backward()
    assert lofit.offsets.dtype == torch.float32 and lofit.offsets.grad.dtype == torch.float32
    assert lofit.offsets.grad.abs().sum(-1).gt(0).all(), "both selected heads get a gradient"
    assert [p.shape for p in lofit.trainable()] == [torch.Size([2, 8])]
    assert all(not p.requires_grad for p in stories_model.parameters()), "the base stays frozen"


def test_bad_shapes_and_double_attach_are_refused(stories_model):
    layout = LofitHooks(stories_model).layout
    with pytest.raises(ValueError, match="scales must have shape"):
        LofitParameters(layout, scales=torch.zeros(5, 8, 4))
    with pytest.raises(ValueError, match="outside the model"):
        LofitParameters(layout, heads=torch.tensor([[5, 0]]), offsets=torch.zeros(1, 8))
    with pytest.raises(ValueError, match="go together"):
        LofitParameters(layout, heads=torch.tensor([[0, 0]]))
    lofit = LofitParameters(layout, scales=torch.zeros(5, 8, 8)).attach(stories_model)
    with pytest.raises(RuntimeError, match="already attached"):
        lofit.attach(stories_model)
    lofit.detach()
    lofit.detach()


def test_accumulated_micro_batches_train_like_one_batch(stories_model, stories_tokenizer):
    """SFT sequences of different lengths: the step loss is Σ token losses / Σ tokens of the whole step, so 2
    micro-batches of 4 accumulated give the update of one batch of 8 (a mean of per-batch means would not)."""
    examples = [SFTExample(p, " and then they all went home happy" * (1 + i % 3)) for i, p in enumerate(PROMPTS)]
    train = encode_examples(stories_tokenizer, examples, 128, 64)
    objective = Objective(stories_model, "sft", pad_token_id(stories_tokenizer), 0.5, "cpu")
    layout = LofitHooks(stories_model).layout
    runs = {}
    for batch_size, grad_accum in ((8, 1), (4, 2), (2, 4)):
        runs[batch_size] = tune_offsets(objective, layout, [(1, 1), (3, 4)], train, [], lr=5e-2, epochs=3,
                                        init_std=1e-3, seed=0, batch_size=batch_size, grad_accum=grad_accum,
                                        max_grad_norm=1.0, progress=False)
    for batch_size in (4, 2):
        assert (runs[batch_size].offsets - runs[8].offsets).abs().max() < 1e-6
        losses = [s["loss"] for s in runs[batch_size].history.steps]
        assert losses == pytest.approx([s["loss"] for s in runs[8].history.steps], rel=1e-5)
    assert runs[8].offsets.abs().max() > 1e-2, "the offsets trained"
