"""The V2 model runner (MRV2) hook: per-slot bank rows expanded to per-token rows on device.

MRV2 cannot run on the CPU build (it needs Triton), so these tests drive the hook with vLLM's real
``InputBatch`` (as the runner builds it: a re-sorted batch, so ``idx_mapping`` is a permutation of slots;
mixed prefill and decode query lengths; token and request padding) and a real ``LofitModelState`` over a
real adapter bank. Slots are chosen here; the runner's ``RequestState`` needs pinned memory (CUDA).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm import SamplingParams
from vllm.config import ModelConfig, SchedulerConfig, VllmConfig
from vllm.v1.core.sched.output import NewRequestData
from vllm.v1.worker.gpu.input_batch import InputBatch, InputBuffers
from vllm.v1.worker.gpu.model_states import resolve_model_state_cls
from vllm.v1.worker.gpu.model_states.default import DefaultModelState

from lofit.adapter import LofitAdapter
from lofit.heads import BaseModelIdentity
from lofit.vllm import bank as bank_module
from lofit.vllm import runner_v2
from lofit.vllm.bank import AdapterBank, fill_token_rows_v2, install_bank
from lofit.vllm.runner_v2 import LofitModelState, hook_installed

MAX_REQS, MAX_TOKENS = 8, 64
CPU = torch.device("cpu")


def make_batch(buffers: InputBuffers, slots: list[int], query_lens: list[int], num_padded: int,
               num_reqs_padded: int | None = None) -> InputBatch:
    """An ``InputBatch`` laid out as MRV2's ``prepare_inputs`` lays it out (batch order = ``slots``)."""
    num_reqs, num_tokens = len(slots), sum(query_lens)
    num_reqs_padded = num_reqs_padded or num_reqs
    counts = np.array(query_lens, dtype=np.int32)
    idx_mapping_np = np.array(slots, dtype=np.intp)
    idx_mapping = torch.tensor(slots, dtype=torch.int64)
    qsl_np = np.full(buffers.max_num_reqs + 1, num_tokens, dtype=np.int32)  # padded requests: empty
    qsl_np[0] = 0
    np.cumsum(counts, out=qsl_np[1:num_reqs + 1])
    buffers.query_start_loc.copy_(torch.from_numpy(qsl_np))
    query_start_loc = buffers.query_start_loc[:num_reqs_padded + 1]
    is_prefilling = counts > 1
    return InputBatch(
        req_ids=[f"req-{s}" for s in slots], num_reqs=num_reqs, num_reqs_after_padding=num_reqs_padded,
        idx_mapping=idx_mapping, idx_mapping_np=idx_mapping_np, expanded_idx_mapping=idx_mapping,
        expanded_local_pos=torch.zeros(num_reqs, dtype=torch.int32),
        num_scheduled_tokens=counts, num_tokens=num_tokens, num_tokens_after_padding=num_padded,
        num_draft_tokens=0, num_draft_tokens_per_req=None,
        query_start_loc=query_start_loc, query_start_loc_np=qsl_np[:num_reqs_padded + 1],
        seq_lens=buffers.seq_lens[:num_reqs], seq_lens_cpu_upper_bound=torch.from_numpy(counts.copy()),
        dcp_local_seq_lens=None, num_computed_tokens_np=np.zeros(num_reqs, dtype=np.int32),
        prefill_len_np=counts.copy(), num_computed_prefill_tokens_np=np.zeros(num_reqs, dtype=np.int32),
        is_prefilling_np=is_prefilling, has_prefill=bool(is_prefilling.any()),
        decode_graph_eligible=not bool(is_prefilling.any()),
        input_ids=buffers.input_ids[:num_padded], positions=buffers.positions[:num_padded],
        is_padding=buffers.is_padding[:num_padded], logits_indices=query_start_loc[1:num_reqs + 1] - 1,
        cu_num_logits=torch.arange(num_reqs + 1, dtype=torch.int32),
        cu_num_logits_np=np.arange(num_reqs + 1, dtype=np.int32), has_structured_output_reqs=False,
        prompt_lens=None,
    )


def reference(slot_rows: torch.Tensor, batch: InputBatch) -> torch.Tensor:
    """Host-side expectation: each request's row repeated by its token count, then zeros up to the padding."""
    rows = [int(slot_rows[s]) for s in batch.idx_mapping_np]
    per_token = [r for r, n in zip(rows, batch.num_scheduled_tokens.tolist(), strict=True) for _ in range(n)]
    return torch.tensor(per_token + [0] * (batch.num_tokens_after_padding - len(per_token)), dtype=torch.int64)


def fill(token_rows: torch.Tensor, slot_rows: torch.Tensor, batch: InputBatch) -> None:
    fill_token_rows_v2(token_rows, slot_rows, batch.idx_mapping, batch.query_start_loc, batch.num_reqs,
                       batch.num_tokens, batch.num_tokens_after_padding)


@pytest.fixture()
def buffers() -> InputBuffers:
    return InputBuffers(MAX_REQS, MAX_TOKENS, CPU)


def test_rows_follow_the_resorted_batch_with_prefill_decode_and_padding(buffers):
    slot_rows = torch.tensor([11, 12, 13, 14, 15, 16, 17, 18])  # slot s holds row 11 + s
    token_rows = torch.full((MAX_TOKENS,), 99, dtype=torch.int64)
    # a 7-token prefill, two decodes, a 3-token prefill chunk, one decode; 13 tokens padded to 16,
    # 5 requests padded to 8 (FULL CUDA graph shape)
    batch = make_batch(buffers, slots=[5, 0, 6, 2, 3], query_lens=[7, 1, 1, 3, 1], num_padded=16, num_reqs_padded=8)
    assert batch.query_start_loc.dtype == torch.int32 and batch.idx_mapping.dtype == torch.int64
    fill(token_rows, slot_rows, batch)
    expected = torch.tensor([16] * 7 + [11, 17] + [13] * 3 + [14] + [0] * 3)
    assert torch.equal(reference(slot_rows, batch), expected)
    assert torch.equal(token_rows[:16], expected)
    assert torch.equal(token_rows[16:], torch.full((MAX_TOKENS - 16,), 99)), "nothing past the padding is written"
    # the identity order would give a different answer, so the test sees a wrong slot mapping
    assert not torch.equal(torch.repeat_interleave(slot_rows[:5], torch.tensor([7, 1, 1, 3, 1])), expected[:13])


def test_every_step_overwrites_the_previous_one(buffers):
    slot_rows = torch.tensor([0, 3, 0, 1, 2, 0, 0, 0])
    token_rows = torch.zeros(MAX_TOKENS, dtype=torch.int64)
    steps = [  # (slots in batch order, query lengths, padded tokens)
        ([0, 1, 3, 4], [9, 6, 4, 2], 24),
        ([4, 3, 1, 0], [1, 1, 1, 1], 8),  # decodes, re-sorted
        ([3], [1], 1),  # no padding at all
        ([1, 4], [30, 2], MAX_TOKENS),  # the whole buffer
    ]
    for slots, query_lens, num_padded in steps:  # one step at a time: they share the runner's buffers
        batch = make_batch(buffers, slots, query_lens, num_padded)
        fill(token_rows, slot_rows, batch)
        assert torch.equal(token_rows[:batch.num_tokens_after_padding], reference(slot_rows, batch))
    assert token_rows[:4].tolist() == [3, 3, 3, 3]


def test_dummy_batch_and_buffer_overflow(buffers):
    slot_rows = torch.tensor([2, 0, 1, 0, 0, 0, 0, 0])
    token_rows = torch.full((MAX_TOKENS,), 7, dtype=torch.int64)
    dummy = InputBatch.make_dummy(3, 10, buffers)  # what dummy runs and capture use: idx_mapping = arange
    fill(token_rows, slot_rows, dummy)
    assert token_rows[:10].tolist() == [2, 2, 2, 0, 0, 0, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="exceed"):
        fill_token_rows_v2(token_rows, slot_rows, dummy.idx_mapping, dummy.query_start_loc, 3, 10, MAX_TOKENS + 1)


# -- the model state over a real bank -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_config(stories_dir) -> VllmConfig:
    model_config = ModelConfig(model=str(stories_dir), dtype="float32", max_model_len=256)
    scheduler = SchedulerConfig(max_num_seqs=MAX_REQS, max_num_batched_tokens=MAX_TOKENS, max_model_len=256,
                                is_encoder_decoder=False)
    return VllmConfig(model_config=model_config, scheduler_config=scheduler)


def make_adapter(identity: BaseModelIdentity, name: str, heads: list[tuple[int, int]], seed: int) -> LofitAdapter:
    return LofitAdapter.random(identity, name, heads, seed=seed)


@pytest.fixture()
def bank(stories_identity):
    bank = AdapterBank(stories_identity, capacity=4, max_num_tokens=MAX_TOKENS)
    bank.load(make_adapter(stories_identity, "a", [(0, 1), (3, 4)], seed=1))
    bank.load(make_adapter(stories_identity, "b", [(1, 0), (4, 7)], seed=2))
    saved = dict(bank_module._ACTIVE)
    install_bank(bank)
    yield bank
    bank_module._ACTIVE.clear()
    bank_module._ACTIVE.update(saved)


def new_request(req_id: str, extra_args: dict | None) -> NewRequestData:
    return NewRequestData(
        req_id=req_id, prompt_token_ids=[1, 2, 3], mm_features=[],
        sampling_params=SamplingParams(max_tokens=4, extra_args=extra_args), pooling_params=None,
        block_ids=([0],), num_computed_tokens=0, lora_request=None, prefill_token_ids=[1, 2, 3],
    )


def test_model_state_tracks_rows_per_slot_and_fills_token_rows(vllm_config, bank, buffers):
    state = LofitModelState(vllm_config, torch.nn.Module(), None, CPU)
    assert state.slot_rows.shape == (MAX_REQS,) and state.bank is bank
    mix = {"lofit_adapters": {"a": 1.0, "b": 0.5}}
    for slot, req_id, extra in [(3, "plain", None), (0, "a1", {"lofit_adapter": "a"}), (5, "mix", mix),
                                (1, "a2", {"lofit_adapter": "a"})]:
        state.add_request(slot, new_request(req_id, extra))
    row_a, row_mix = int(state.slot_rows[0]), int(state.slot_rows[5])
    assert row_a > 0 and row_mix not in (0, row_a)
    assert state.slot_rows.tolist() == [row_a, row_a, 0, 0, 0, row_mix, 0, 0]
    assert bank.refcounts() == {("a",): 2, ("a", "b"): 1}

    # a re-sorted step: the 4-token prefill of "mix", decodes of "a2" and "plain", a 2-token chunk of "a1"
    batch = make_batch(buffers, slots=[5, 1, 3, 0], query_lens=[4, 1, 1, 2], num_padded=12)
    bank.token_rows.fill_(9)
    assert state.prepare_inputs(batch, None) == {}  # DefaultModelState's dict (no M-RoPE) passes through
    assert bank.token_rows[:12].tolist() == [row_mix] * 4 + [row_a, 0, row_a, row_a] + [0] * 4

    # finish "a1"; preempt "mix" and re-admit it in another slot; unknown ids are a no-op
    state.remove_request("a1")
    state.remove_request("mix")
    state.remove_request("never-seen")
    assert state.slot_rows.tolist() == [0, row_a, 0, 0, 0, 0, 0, 0]
    assert bank.refcounts() == {("a",): 1, ("a", "b"): 0}
    state.add_request(6, new_request("mix", mix))
    assert int(state.slot_rows[6]) == row_mix and bank.refcounts()[("a", "b")] == 1

    batch = make_batch(buffers, slots=[6, 1], query_lens=[3, 1], num_padded=8)
    state.prepare_inputs(batch, None)
    assert torch.equal(bank.token_rows[:8], reference(state.slot_rows, batch))
    assert bank.token_rows[:8].tolist() == [row_mix] * 3 + [row_a] + [0] * 4

    # CUDA-graph capture: every token reads row 0
    assert state.prepare_dummy_inputs(4, 16) == {}
    assert not bank.token_rows.any()


def _unbuilt(wrapper: type, vllm_config: VllmConfig) -> torch.nn.Module:
    """An instance of a ``Lofit<Arch>`` wrapper without vLLM's layers (MRV2's resolver only looks at the
    modules, the config and ``get_model_state_cls``)."""
    model = wrapper.__new__(wrapper)
    torch.nn.Module.__init__(model)
    model.lofit_vllm_config = vllm_config
    return model


def test_the_model_selects_the_state_and_hook_installed_sees_it(vllm_config, bank):
    from lofit.vllm.models import LofitLlamaForCausalLM

    # vLLM's own resolver, called on an instance as MRV2 does
    model = _unbuilt(LofitLlamaForCausalLM, vllm_config)
    assert resolve_model_state_cls(vllm_config, model) is LofitModelState
    assert issubclass(LofitModelState, DefaultModelState)
    state = LofitModelState(vllm_config, torch.nn.Module(), None, CPU)
    assert hook_installed(SimpleNamespace(model_state=state))
    assert not hook_installed(SimpleNamespace(model_state=DefaultModelState(vllm_config, torch.nn.Module(), None, CPU)))
    assert not hook_installed(SimpleNamespace())


def test_a_model_with_its_own_state_gets_it_composed_with_the_rows(vllm_config, bank, buffers):
    """A stock model that brings its own MRV2 state keeps it: LoFiT's rows are added on top, and the own
    state's inputs still reach the model."""
    from vllm.model_executor.models.longcat_flash_ngram import LongcatNgramModelState

    from lofit.vllm import models

    resolved = resolve_model_state_cls(vllm_config, _unbuilt(models.LofitLongcatFlashNgramForCausalLM, vllm_config))
    assert issubclass(resolved, LongcatNgramModelState) and issubclass(resolved, runner_v2.LofitModelStateMixin)

    class OwnState(DefaultModelState):
        def prepare_inputs(self, input_batch, req_states):
            return {**super().prepare_inputs(input_batch, req_states), "own_input": input_batch.num_tokens}

    class Own(torch.nn.Module):
        @staticmethod
        def get_model_state_cls():
            return OwnState

    state_cls = resolve_model_state_cls(vllm_config, _unbuilt(models.wrapper_class(Own), vllm_config))
    assert state_cls.__mro__[1:3] == (runner_v2.LofitModelStateMixin, OwnState)
    state = state_cls(vllm_config, torch.nn.Module(), None, CPU)
    state.add_request(2, new_request("a1", {"lofit_adapter": "a"}))
    batch = make_batch(buffers, slots=[2], query_lens=[3], num_padded=4)
    assert state.prepare_inputs(batch, None) == {"own_input": 3}
    row_a = int(state.slot_rows[2])
    assert row_a > 0 and bank.token_rows[:4].tolist() == [row_a] * 3 + [0]
