"""The two training stages and their losses, on the real stories260K model."""

from __future__ import annotations

import math
import random

import pytest
import torch

from lofit.hf import pad_token_id
from lofit.intervene import LofitHooks
from lofit.tasks import PreferencePair, SFTExample
from lofit.train.data import Encoded, collate, encode, encode_examples
from lofit.train.losses import dpo_loss
from lofit.train.objective import Objective
from lofit.train.stage1 import rank_heads, select_heads
from lofit.train.stage2 import tune_offsets

STARTS = ["Once upon a time", "The little dog", "Tom and Lily", "One day, a bird", "The sun was", "A big bear",
          "She saw a", "The boy wanted", "There was a", "Mom said", "The cat", "Sam had a", "It was a",
          "Ben and Mia", "The tree", "A girl named", "They went to", "He liked", "The car", "Lucy found",
          "The old man", "A small fish", "Every morning", "The park was", "Dad gave"]


def hand_logprob(model, ids: list[int], first_scored: int) -> float:
    """Sum over t >= first_scored of log p(ids[t] | ids[:t]), one softmax at a time."""
    logits = model(torch.tensor([ids])).logits[0]
    total = 0.0
    for t in range(first_scored, len(ids)):
        probs = torch.softmax(logits[t - 1].double(), dim=-1)
        total += math.log(probs[ids[t]].item())
    return total


def test_encode_puts_bos_on_the_prompt_and_eos_on_the_answer(stories_tokenizer):
    seq = encode(stories_tokenizer, "Q: Can pigs fly? A:", "No", max_prompt_len=128, max_len=512)
    prompt = stories_tokenizer("Q: Can pigs fly? A:").input_ids
    answer = stories_tokenizer("No", add_special_tokens=False).input_ids
    assert seq.ids == prompt + answer + [stories_tokenizer.eos_token_id]
    assert seq.ids[0] == stories_tokenizer.bos_token_id
    assert seq.mask == [False] * len(prompt) + [True] * (len(answer) + 1)


def test_encode_truncates_the_prompt_from_the_left_keeping_bos(stories_tokenizer):
    long_prompt = " ".join(["word"] * 100)
    seq = encode(stories_tokenizer, long_prompt, "end", max_prompt_len=10, max_len=12)
    assert seq.mask.count(False) == 10 and seq.ids[0] == stories_tokenizer.bos_token_id
    assert len(seq.ids) == 12 and seq.ids[-1] != stories_tokenizer.eos_token_id, "answer cut at max_len"


def test_sft_loss_counts_only_completion_tokens(stories_model, stories_tokenizer):
    examples = [SFTExample("Once upon a time", " there was a girl"), SFTExample("The dog", " ran home")]
    encoded = encode_examples(stories_tokenizer, examples, 128, 64)
    objective = Objective(stories_model, "sft", pad_token_id(stories_tokenizer), 0.5, "cpu")
    batch = collate(encoded, [0, 1], objective.pad_id)
    loss = objective.loss(batch, encoded).item()
    total, count = 0.0, 0
    for (seq,) in encoded:
        first = seq.mask.index(True)
        total -= hand_logprob(stories_model, seq.ids, first)
        count += len(seq.ids) - first
    assert loss == pytest.approx(total / count, rel=1e-5)


def test_dpo_loss_equals_a_hand_computation(stories_model, stories_tokenizer):
    pairs = [PreferencePair("Q: Can pigs fly? A:", "No, pigs cannot fly", "Yes, pigs can fly"),
             PreferencePair("Q: Is the sky blue? A:", "Yes", "No, it is green")]
    encoded = encode_examples(stories_tokenizer, pairs, 128, 512)
    objective = Objective(stories_model, "dpo", pad_token_id(stories_tokenizer), beta=0.5, device="cpu")
    objective.precompute_reference(encoded, batch_size=2)  # the reference: the plain model
    hooks = LofitHooks(stories_model)
    hooks.offsets = torch.randn(5, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.3
    loss = objective.loss(collate(encoded, [0, 1], objective.pad_id), encoded).item()

    expected = 0.0
    for chosen, rejected in encoded:
        first = chosen.mask.index(True)
        policy_w, policy_l = (hand_logprob(stories_model, s.ids, first) for s in (chosen, rejected))
        hooks.offsets, saved = None, hooks.offsets
        ref_w, ref_l = (hand_logprob(stories_model, s.ids, first) for s in (chosen, rejected))
        hooks.offsets = saved
        margin = (policy_w - ref_w) - (policy_l - ref_l)
        expected += -math.log(1 / (1 + math.exp(-0.5 * margin))) / len(encoded)
    hooks.remove()
    assert loss == pytest.approx(expected, rel=1e-4)
    assert loss != pytest.approx(math.log(2), abs=1e-3), "the offsets must move the policy away from the reference"


def test_dpo_loss_formula_on_numbers():
    loss = dpo_loss(torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.5]), 0.5)
    # margin = (-3 + 4) - (-5 + 4.5) = 1.5; loss = -log sigmoid(0.75)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.75)), rel=1e-6)


def test_rank_heads_is_layer_major_and_descending():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.8]])
    assert rank_heads(scores) == [(0, 1), (1, 2), (1, 0), (1, 1), (0, 0), (0, 2)]
    assert rank_heads(scores, keep=2) == [(0, 1), (1, 2)]


@torch.no_grad()
def last_token_logprobs(model, contexts: list[list[int]]) -> torch.Tensor:
    return torch.stack([torch.log_softmax(model(torch.tensor([c])).logits[0, -1], -1) for c in contexts])


@pytest.mark.slow
@pytest.mark.parametrize("trial", [0, 1])
def test_stage1_finds_the_heads_of_a_planted_signal(stories_model, stories_tokenizer, trial):
    """Plant a signal in three random heads and check stage 1 ranks exactly those three on top.

    The model is made so that the three heads carry the attention output (every other head's o_proj
    columns are damped 10x), and the task's answers are what the model says when those heads are scaled
    by 2: at each context, the token whose log-probability the planted scaling raises most. Only the
    planted heads can explain the answers.
    """
    planted = sorted(random.Random(trial).sample([(layer, head) for layer in range(5) for head in range(8)], 3))
    for layer, block in enumerate(stories_model.model.layers):
        for head in range(8):
            if (layer, head) not in planted:
                block.self_attn.o_proj.weight[:, head * 8:(head + 1) * 8] *= 0.1
    contexts = []
    for start in STARTS:
        ids = torch.tensor([stories_tokenizer(start).input_ids])
        out = stories_model.generate(ids, max_new_tokens=12, do_sample=False)[0].tolist()
        contexts += [out[: ids.shape[1] + cut] for cut in (2, 6, 10)]
    hooks = LofitHooks(stories_model)
    base = last_token_logprobs(stories_model, contexts)
    teacher_scales = torch.zeros(5, 8, 8)
    for layer, head in planted:
        teacher_scales[layer, head] = 1.0
    hooks.scales = teacher_scales
    targets = (last_token_logprobs(stories_model, contexts) - base).argmax(-1).tolist()
    hooks.scales = None
    train = [(Encoded(c + [t], [False] * len(c) + [True]),) for c, t in zip(contexts, targets, strict=True)]
    objective = Objective(stories_model, "sft", pad_token_id(stories_tokenizer), 0.5, "cpu")

    selection = select_heads(objective, hooks.layout, train, [], lr=1e-2, l1=1e-2, epochs=3, init_std=1e-3, seed=42,
                             batch_size=8, grad_accum=1, max_grad_norm=1.0, progress=False)

    assert sorted(selection.top(3)) == planted
    assert selection.scores.shape == (5, 8)
    assert len(selection.ranking) == 40, "the ranking keeps min(160, all heads)"
    assert all(step["l1_penalty"] > 0 for step in selection.history.steps)


def test_stage2_lowers_the_training_loss_and_trains_only_selected_offsets(stories_model, stories_tokenizer):
    examples = [SFTExample(start, " and the end") for start in STARTS[:12]]
    train = encode_examples(stories_tokenizer, examples, 128, 64)
    objective = Objective(stories_model, "sft", pad_token_id(stories_tokenizer), 0.5, "cpu")
    hooks = LofitHooks(stories_model)
    weights_before = {k: v.clone() for k, v in stories_model.state_dict().items()}
    heads = [(4, 1), (0, 3), (2, 6)]

    tuned = tune_offsets(objective, hooks.layout, heads, train, train, lr=5e-2, epochs=4, init_std=1e-3, seed=0,
                         batch_size=4, grad_accum=1, max_grad_norm=1.0, progress=False)

    assert tuned.val_after.loss < tuned.val_before.loss - 0.5
    assert tuned.history.epochs[-1]["train_loss"] < tuned.history.epochs[0]["train_loss"]
    assert tuned.heads.tolist() == sorted(map(list, heads))
    assert tuned.offsets.shape == (3, 8) and tuned.offsets.abs().max() > 1e-2
    for key, value in stories_model.state_dict().items():
        assert torch.equal(value, weights_before[key]), f"base weight {key} changed"
    hooks.remove()


def test_linear_decay_without_warmup_and_gradient_accumulation(stories_model, stories_tokenizer):
    examples = [SFTExample(start, " the end") for start in STARTS[:8]]
    train = encode_examples(stories_tokenizer, examples, 128, 64)
    objective = Objective(stories_model, "sft", pad_token_id(stories_tokenizer), 0.5, "cpu")
    hooks = LofitHooks(stories_model)
    tuned = tune_offsets(objective, hooks.layout, [(1, 1)], train, [], lr=0.1, epochs=2, init_std=1e-3, seed=0,
                         batch_size=2, grad_accum=2, max_grad_norm=1.0, progress=False)
    hooks.remove()
    # 8 examples / batch 2 = 4 micro-batches = 2 optimiser steps per epoch, 4 in all.
    assert [round(step["lr"], 6) for step in tuned.history.steps] == [0.1, 0.075, 0.05, 0.025]
    assert tuned.val_before is None and tuned.val_after is None


def test_parameters_that_stop_being_finite_end_the_stage_with_a_clear_error(stories_model, stories_tokenizer):
    from lofit.train.loop import TrainingDiverged

    examples = [SFTExample(start, " the end") for start in STARTS[:4]]
    train = encode_examples(stories_tokenizer, examples, 128, 64)
    stories_model.model.layers[4].self_attn.o_proj.weight[0, 0] = float("nan")  # the loss turns NaN
    objective = Objective(stories_model, "sft", pad_token_id(stories_tokenizer), 0.5, "cpu")
    with pytest.raises(TrainingDiverged, match=r"stage 2: tune offsets: the LoFiT parameters stopped being finite "
                                               r"at step 1 \(loss nan.*lower --lr-v \(now 0.01\)"):
        tune_offsets(objective, LofitHooks(stories_model).layout, [(1, 1)], train, [], lr=1e-2, epochs=1,
                     init_std=1e-3, seed=0, batch_size=4, grad_accum=1, max_grad_norm=1.0, progress=False)
