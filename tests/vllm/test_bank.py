"""The adapter bank: fixed-address tables, refcounted rows, the per-token gather-add, TP slicing, and the rows
running requests hold.

These parts of the vLLM plugin are plain torch, so they are checked here against the transformers
reference path without an engine.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from lofit.adapter import AdapterError, LofitAdapter
from lofit.heads import BaseModelIdentity
from lofit.intervene import apply_adapters
from lofit.vllm.bank import AdapterBank, BankError, RequestRows


def make_adapter(identity: BaseModelIdentity, name: str, heads: list[tuple[int, int]], seed: int) -> LofitAdapter:
    return LofitAdapter.random(identity, name, heads, seed=seed)


@pytest.fixture()
def adapters(stories_identity):
    return {
        "a": make_adapter(stories_identity, "a", [(0, 1), (3, 4), (4, 7)], seed=1),
        "b": make_adapter(stories_identity, "b", [(1, 0), (3, 4)], seed=2),
    }


@pytest.fixture()
def bank(stories_identity, adapters) -> AdapterBank:
    bank = AdapterBank(stories_identity, capacity=4, max_num_tokens=64)
    for adapter in adapters.values():
        bank.load(adapter)
    return bank


def test_row_zero_is_no_adapter(bank):
    x = torch.randn(5, 64)
    for layer in range(5):
        assert torch.equal(bank.apply(layer, x), x)


def test_rows_hold_weighted_sums_and_are_shared_per_combination(bank, adapters):
    row_a, combo_a = bank.acquire({"a": 1.0})
    again, _ = bank.acquire({"a": 1.0})
    row_mix, _ = bank.acquire({"a": 0.5, "b": -2.0})
    assert row_a == again and row_mix not in (0, row_a)
    assert bank.refcounts()[("a",)] == 2
    expected = 0.5 * adapters["a"].dense_offsets() - 2.0 * adapters["b"].dense_offsets()
    torch.testing.assert_close(bank.tables[:, row_mix], expected.reshape(5, 64))
    torch.testing.assert_close(bank.tables[:, row_a], adapters["a"].dense_offsets().reshape(5, 64))
    bank.release(combo_a)
    assert bank.refcounts()[("a",)] == 1


def test_tables_keep_their_address(bank):
    tables, rows = bank.tables.data_ptr(), bank.token_rows.data_ptr()
    for weights in ({"a": 1.0}, {"b": 1.0}, {"a": 2.0}, {"a": 1.0, "b": 1.0}):
        _, combo = bank.acquire(weights)
        bank.release(combo)
    bank.fill_token_rows([1, 2], [3, 4], num_padded=16)
    assert bank.tables.data_ptr() == tables and bank.token_rows.data_ptr() == rows


def test_idle_rows_are_recycled_least_recently_used_and_full_bank_is_an_error(bank):
    combos = [bank.acquire({"a": float(w)}) for w in (1, 2, 3)]  # capacity 4: rows 1, 2, 3 all held
    assert [row for row, _ in combos] == [1, 2, 3]
    with pytest.raises(BankError, match="at least max_num_seqs"):
        bank.acquire({"b": 1.0})
    bank.acquire({"a": 1.0})  # weight 1.0 used again: weight 2.0 is now the least recently used
    for _, combo in combos:
        bank.release(combo)
    row_b, _ = bank.acquire({"b": 1.0})
    assert row_b == 2
    assert bank.acquire({"a": 3.0})[0] == 3, "an idle cached row is reused as it is"


def test_unload_forgets_the_name_but_admitted_requests_keep_the_content(bank, adapters):
    _, held = bank.acquire({"a": 1.0, "b": 1.0})
    _, admitted = bank.acquire({"b": 2.0})  # stands for a request stamped with b's content, not yet running
    bank.release(admitted)
    bank.unload("b")
    assert bank.loaded().keys() == {"a"}
    with pytest.raises(BankError, match="not loaded"):
        bank.acquire({"b": 1.0})
    row, _ = bank.acquire(admitted)  # by content hash: still served, exactly
    torch.testing.assert_close(bank.tables[:, row], 2.0 * adapters["b"].dense_offsets().reshape(5, 64))
    bank.release(held)
    with pytest.raises(BankError, match="not loaded"):
        bank.unload("b")


def test_retired_content_is_evicted_beyond_the_retention_limit(bank, stories_identity, monkeypatch):
    monkeypatch.setattr("lofit.vllm.bank.RETAINED", 1)
    _, first = bank.acquire({"a": 1.0})
    bank.release(first)
    for seed in (10, 11):  # two reloads retire two contents; only the newest retired one is kept
        bank.load(make_adapter(stories_identity, "a", [(2, 2)], seed=seed))
    with pytest.raises(BankError, match="no longer resident"):
        bank.acquire(first)


def test_content_pinned_by_live_requests_is_never_evicted(bank, stories_identity, monkeypatch):
    monkeypatch.setattr("lofit.vllm.bank.RETAINED", 0)
    first = bank.combination({"a": 1.0})  # admitted, not yet running: no row held
    for seed in (10, 11, 12):
        bank.load(make_adapter(stories_identity, "a", [(2, 2)], seed=seed), pinned=first.shas)
    row, _ = bank.acquire(first)
    assert row > 0 and torch.count_nonzero(bank.tables[:, row]) > 0
    bank.release(first)
    bank.unload("a", pinned=())  # nothing live any more: the old contents go
    with pytest.raises(BankError, match="no longer resident"):
        bank.acquire(first)


def test_reloading_a_name_with_new_content_changes_the_fingerprint(bank, stories_identity):
    _, old = bank.acquire({"a": 1.0})
    old_row = bank.tables[:, 1].clone()
    bank.load(make_adapter(stories_identity, "a", [(2, 2)], seed=9))
    row, new = bank.acquire({"a": 1.0})
    assert new.cache_salt != old.cache_salt and row != 1
    assert torch.equal(bank.tables[:, 1], old_row), "running requests keep the content they started with"


def test_adapter_for_another_model_is_refused(bank, stories_identity):
    other = BaseModelIdentity(**{**stories_identity.to_dict(), "fingerprint": "sha256:" + "3" * 64})
    with pytest.raises(AdapterError, match="fingerprint"):
        bank.load(make_adapter(other, "c", [(0, 0)], seed=3))


def test_fill_token_rows_repeats_each_request_row_and_zeroes_padding(bank):
    bank.token_rows.fill_(7)
    n = bank.fill_token_rows([2, 0, 3], [3, 1, 2], num_padded=8)
    assert n == 6
    assert bank.token_rows[:9].tolist() == [2, 2, 2, 0, 3, 3, 0, 0, 7]
    with pytest.raises(BankError, match="token buffer"):
        bank.fill_token_rows([1], [65])


def test_tensor_parallel_ranks_hold_their_own_head_columns(stories_identity, adapters):
    whole = AdapterBank(stories_identity, capacity=2, max_num_tokens=4)
    ranks = [AdapterBank(stories_identity, capacity=2, max_num_tokens=4, tp_rank=r, tp_size=2) for r in (0, 1)]
    for bank in (whole, *ranks):
        bank.load(adapters["a"])
        bank.acquire({"a": 1.0})
    torch.testing.assert_close(torch.cat([r.tables for r in ranks], dim=-1), whole.tables)
    with pytest.raises(ValueError, match="must divide"):
        AdapterBank(stories_identity, capacity=2, max_num_tokens=4, tp_size=3)


def test_gather_add_equals_the_reference_path_on_a_mixed_batch(stories_model, stories_tokenizer, bank, adapters):
    """Flatten a batch as vLLM does (one row per token) and steer it through the bank."""
    prompts = ["Once upon a time", "The little dog ran", "Tom and Lily went to the park"]
    wanted = [{"a": 1.0}, None, {"a": 0.5, "b": 1.5}]
    rows = [0 if w is None else bank.acquire(w)[0] for w in wanted]
    encoded = [stories_tokenizer(p).input_ids for p in prompts]
    width = max(map(len, encoded))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(encoded):
        ids[i, : len(seq)], mask[i, : len(seq)] = torch.tensor(seq), 1
    bank.fill_token_rows(rows, [width] * len(prompts))

    def through_bank(layer, _module, args):
        x = args[0]
        return (bank.apply(layer, x.reshape(-1, x.shape[-1])).reshape(x.shape),)

    handles = [block.self_attn.o_proj.register_forward_pre_hook(partial(through_bank, layer))
               for layer, block in enumerate(stories_model.model.layers)]
    with torch.no_grad():
        banked = stories_model(input_ids=ids, attention_mask=mask).logits
    for handle in handles:
        handle.remove()

    dense = 0.5 * adapters["a"].dense_offsets() + 1.5 * adapters["b"].dense_offsets()
    heads = torch.tensor([[0, 1], [1, 0], [3, 4], [4, 7]])
    mixed = LofitAdapter(heads=heads, offsets=dense[heads[:, 0], heads[:, 1]], base_model=adapters["a"].base_model,
                         name="mix")
    with torch.no_grad(), apply_adapters(stories_model, [adapters["a"], None, mixed]):
        reference = stories_model(input_ids=ids, attention_mask=mask).logits
    for i, seq in enumerate(encoded):
        torch.testing.assert_close(banked[i, : len(seq)], reference[i, : len(seq)], rtol=1e-5, atol=1e-5)


def test_rows_are_held_until_the_request_ends(stories_identity):
    bank = AdapterBank(stories_identity, capacity=3, max_num_tokens=8)
    bank.load(LofitAdapter(heads=torch.tensor([[0, 0]]), offsets=torch.ones(1, 8), base_model=stories_identity,
                           name="a"))
    rows = RequestRows(bank)
    first = rows.row_for("r1", {"lofit_adapter": "a"})
    assert rows.row_for("r1", {"lofit_adapter": "a"}) == first, "a request keeps its row across steps"
    assert rows.row_for("r2", {"lofit_adapter": "a"}) == first and rows.row_for("r3", None) == 0
    assert bank.refcounts()[("a",)] == 2
    rows.release_finished({"r2", "r3"})
    assert bank.refcounts()[("a",)] == 1
    rows.release_finished(set())
    assert bank.refcounts()[("a",)] == 0
    bank.unload("a")
