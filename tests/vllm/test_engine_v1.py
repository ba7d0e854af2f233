"""The LoFiT model wrapper inside a real vLLM engine (the CPU build runs the V1 model runner), on SmolLM2-135M.

One engine per module (start-up costs 1-2 minutes here), compiled (vLLM's default), with prefix caching on
and a token budget of 32 per step, so every prompt here is prefilled in several chunks. Requests choose
adapters through ``SamplingParams.extra_args``; every output is checked against the transformers reference.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from vllm import SamplingParams  # noqa: E402

from lofit.adapter import LofitAdapter, load_adapter  # noqa: E402
from lofit.default_model import default_model_dir  # noqa: E402
from lofit.intervene import apply_adapters, combine  # noqa: E402

PROMPTS = [
    "Q: What happens to you if you eat watermelon seeds? A: The watermelon seeds pass through your digestive "
    "system. Q: Can pigs fly? A:",
    "Q: What is the spiciest part of a chili pepper? A: The spiciest part of a chili pepper is the placenta. "
    "Q: What happens if you crack your knuckles a lot? A:",
]
ADAPTER = default_model_dir().parents[1] / "adapters" / "truthfulqa"
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def offline(prepared_model_dir):
    """The Python API's engine, started with the shipped adapters preloaded through ``LOFIT_ADAPTERS``."""
    from lofit.vllm.offline import LofitLLM

    os.environ["LOFIT_ADAPTERS"] = str(ADAPTER.parent)
    try:
        llm = LofitLLM(default_model_dir(), dtype="float32", gpu_memory_utilization=0.1, max_model_len=512,
                       max_num_seqs=8, max_num_batched_tokens=32, enable_prefix_caching=True, block_size=32, seed=0)
    finally:
        del os.environ["LOFIT_ADAPTERS"]
    yield llm
    del llm


@pytest.fixture(scope="module")
def engine(offline):
    return offline.llm


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(default_model_dir())


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, LofitAdapter]:
    """The shipped adapter and a second, random one on other heads, saved where workers can load them."""
    shipped = load_adapter(ADAPTER)
    other = LofitAdapter.random(shipped.base_model, "random4", [(3, 1), (12, 5), (21, 2), (27, 8)], seed=1, scale=0.5)
    other.path = other.save(tmp_path_factory.mktemp("adapters") / "random4")
    shipped.path = ADAPTER
    return {"a": shipped, "b": other}


def greedy_reference(reference, prompt: str, adapters: list[LofitAdapter] = (),
                     strengths: list[float] = ()) -> str:
    """What transformers generates greedily with these adapters summed at these strengths."""
    model, tokenizer = reference
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        mix = combine(list(zip(adapters, strengths, strict=True))) if adapters else None
        with apply_adapters(model, mix):
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def run(llm, requests: list[tuple[str, dict | None]], salt: str | None = None) -> list:
    """Generate greedily for ``[(prompt, extra_args), ...]`` in one batch; the request outputs."""
    from vllm import SamplingParams

    prompts = [{"prompt": p, **({"cache_salt": salt} if salt else {})} for p, _ in requests]
    params = [SamplingParams(temperature=0, max_tokens=NEW_TOKENS, extra_args=x) for _, x in requests]
    return llm.generate(prompts, params, use_tqdm=False)


def texts(outputs) -> list[str]:
    return [o.outputs[0].text for o in outputs]


def load(llm, adapter: LofitAdapter) -> dict:
    [info] = llm.collective_rpc("lofit_load", args=(str(adapter.path),))
    return info


def test_start_up_preloads_adapters_and_the_python_api_steers_per_prompt(offline, reference):
    shipped_dirs = [p for p in ADAPTER.parent.iterdir() if p.is_dir()]
    assert offline.adapters() == {p.name: load_adapter(p).content_sha256 for p in shipped_dirs}
    prompt = PROMPTS[1]
    outputs = offline.generate([prompt] * 3, SamplingParams(temperature=0, max_tokens=NEW_TOKENS),
                               adapters=[None, "truthfulqa", {"truthfulqa": 4.0}])
    shipped = load_adapter(ADAPTER)
    assert texts(outputs) == [greedy_reference(reference, prompt),
                              greedy_reference(reference, prompt, [shipped], [1.0]),
                              greedy_reference(reference, prompt, [shipped], [4.0])]


def test_start_up_checked_the_hook_and_the_self_test_passes(engine):
    from lofit.vllm import selftest

    core = engine.llm_engine.engine_core.engine_core
    result = selftest.self_test(core)
    assert result["unsteered_change"] <= 1e-3 and result["steered_change"] > 0.5
    from lofit.heads import identity_from_checkpoint

    assert engine.collective_rpc("lofit_status") == [
        {"bank": True, "base": identity_from_checkpoint(default_model_dir(), name=default_model_dir().name).to_dict(),
         "runner": "v1", "hook": True, "class": "vllm.v1.worker.cpu_model_runner.CPUModelRunner"}]


def test_the_engine_refuses_to_start_when_the_hook_is_missing(engine, monkeypatch):
    from lofit.vllm import selftest

    monkeypatch.setattr("lofit.vllm.runner_v1.hook_installed", lambda runner: False)
    with pytest.raises(selftest.SelfTestError, match="refusing to start"):
        selftest.check_workers(engine.llm_engine.engine_core.engine_core)


def test_the_self_test_fails_loudly_when_steering_does_not_reach_the_model(engine, monkeypatch):
    from lofit.vllm import selftest
    from lofit.vllm.bank import AdapterBank

    monkeypatch.setattr(AdapterBank, "_write", lambda self, index, combo: self.tables[:, index].zero_())
    with pytest.raises(selftest.SelfTestError, match="steering is not applied"):
        selftest.self_test(engine.llm_engine.engine_core.engine_core)


def test_the_self_test_fails_loudly_when_steering_leaks_across_requests(engine, monkeypatch):
    """Every request of a batch is given the row of the first steered one: plain requests next to a steered one
    are steered too, which only the mixed batch shows."""
    from lofit.vllm import selftest
    from lofit.vllm.bank import RequestRows

    row_for = RequestRows.row_for

    def leaky(self, req_id, extra_args):
        rows = [row for row, _ in self._held.values() if row] + [row_for(self, req_id, extra_args)]
        return next(row for row in rows if row) if any(rows) else 0

    monkeypatch.setattr(RequestRows, "row_for", leaky)
    with pytest.raises(selftest.SelfTestError, match="steering leaks across requests"):
        selftest.self_test(engine.llm_engine.engine_core.engine_core)


def test_unsteered_engine_equals_the_plain_model(engine, reference):
    assert texts(run(engine, [(p, None) for p in PROMPTS])) == [greedy_reference(reference, p) for p in PROMPTS]


def test_a_mixed_batch_gives_each_request_its_reference_output(engine, reference, adapters):
    a, b = adapters["a"], adapters["b"]
    assert load(engine, a) == {"name": "truthfulqa", "content_sha256": a.content_sha256, "num_heads": 8}
    load(engine, b)
    cases = [  # (extra_args, adapters, strengths)
        (None, [], []),
        ({"lofit_adapter": a.name}, [a], [1.0]),
        ({"lofit_adapter": b.name}, [b], [1.0]),
        ({"lofit_adapter": a.name, "lofit_scale": 0.5}, [a], [0.5]),
        ({"lofit_adapters": {a.name: 1.0, b.name: 1.0}}, [a, b], [1.0, 1.0]),
        ({"lofit_adapter": a.name, "lofit_scale": 4.0}, [a], [4.0]),
    ]
    requests = [(PROMPTS[i % 2], x) for i, (x, _, _) in enumerate(cases)]
    batch = texts(run(engine, requests))
    expected = [greedy_reference(reference, PROMPTS[i % 2], ads, s) for i, (_, ads, s) in enumerate(cases)]
    assert batch == expected
    assert len(set(expected[1::2])) > 1 and expected[5] != expected[1], "the adapters must change the text"
    alone = [texts(run(engine, [request]))[0] for request in requests]
    assert alone == batch


def test_prefix_cache_is_keyed_by_adapter_content(engine, reference, adapters, tmp_path):
    a, b = adapters["a"], adapters["b"]
    load(engine, a)
    prompt = PROMPTS[0] + " Answer briefly."
    [steered] = run(engine, [(prompt, {"lofit_adapter": a.name, "lofit_scale": 4.0})])
    [plain] = run(engine, [(prompt, None)])
    assert plain.num_cached_tokens == 0, "an unsteered request must not read KV computed under an adapter"
    assert plain.outputs[0].text == greedy_reference(reference, prompt)
    [again] = run(engine, [(prompt, {"lofit_adapter": a.name, "lofit_scale": 4.0})])
    assert again.num_cached_tokens > 0, "the same adapter shares its prefix blocks"
    assert again.outputs[0].text == steered.outputs[0].text == greedy_reference(reference, prompt, [a], [4.0])

    # reload the name with new content: a new fingerprint, so no stale KV
    renamed = LofitAdapter(heads=b.heads, offsets=b.offsets, base_model=b.base_model, name=a.name)
    renamed.path = renamed.save(tmp_path / "reloaded")
    assert load(engine, renamed)["content_sha256"] != a.content_sha256
    [reloaded] = run(engine, [(prompt, {"lofit_adapter": a.name, "lofit_scale": 4.0})])
    assert reloaded.num_cached_tokens == 0
    assert reloaded.outputs[0].text == greedy_reference(reference, prompt, [b], [4.0])
    load(engine, a)  # restore


def test_a_client_salt_is_kept_and_cannot_enter_lofit_namespace(engine, reference, adapters):
    from lofit.vllm.admission import AdmissionError

    load(engine, adapters["a"])
    prompt = PROMPTS[1] + " Think."
    [first] = run(engine, [(prompt, {"lofit_adapter": "truthfulqa"})], salt="tenant-1")
    [other] = run(engine, [(prompt, {"lofit_adapter": "truthfulqa"})], salt="tenant-2")
    assert other.num_cached_tokens == 0, "tenants keep separate caches"
    assert first.outputs[0].text == other.outputs[0].text
    with pytest.raises(AdmissionError, match="must not start with 'lofit:'"):
        run(engine, [(prompt, None)], salt="lofit:" + "0" * 32)


def test_loading_and_unloading_while_requests_run_changes_nothing_for_them(engine, reference, adapters, tmp_path):
    from vllm import SamplingParams

    a, b = adapters["a"], adapters["b"]
    load(engine, a)
    core = engine.llm_engine
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, extra_args={"lofit_adapter": a.name})
    core.add_request("running-a", PROMPTS[0], params)
    core.add_request("running-plain", PROMPTS[1], SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
    done, steps = {}, 0
    while core.has_unfinished_requests():
        for out in core.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].text
        steps += 1
        if steps == 2:  # mid-prefill: load another adapter, reload a's name with new content, then unload it
            load(engine, b)
            renamed = LofitAdapter(heads=b.heads, offsets=b.offsets, base_model=b.base_model, name=a.name)
            renamed.path = renamed.save(tmp_path / "reloaded")
            load(engine, renamed)
            engine.collective_rpc("lofit_unload", args=(a.name,))
    assert done == {"running-a": greedy_reference(reference, PROMPTS[0], [a], [1.0]),
                    "running-plain": greedy_reference(reference, PROMPTS[1])}
    load(engine, a)  # restore


def test_content_a_waiting_request_needs_survives_any_number_of_reloads(engine, reference, adapters, tmp_path,
                                                                       monkeypatch):
    """A request admitted with adapter a's content waits (not yet scheduled) while a's name is reloaded past
    the bank's retention: the workers keep that content for it, and it gets exactly a's output."""
    from vllm import SamplingParams

    monkeypatch.setattr("lofit.vllm.bank.RETAINED", 0)  # every retired content would be evicted at once
    a = adapters["a"]
    load(engine, a)
    core = engine.llm_engine
    core.add_request("waiting-a", PROMPTS[0], SamplingParams(temperature=0, max_tokens=NEW_TOKENS,
                                                             extra_args={"lofit_adapter": a.name}))
    for i in range(3):  # new content under a's name each time
        other = LofitAdapter.random(a.base_model, a.name, "all", seed=100 + i, scale=0.5)
        other.path = other.save(tmp_path / f"reload-{i}")
        load(engine, other)
    done = {}
    while core.has_unfinished_requests():
        for out in core.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].text
    assert done == {"waiting-a": greedy_reference(reference, PROMPTS[0], [a], [1.0])}
    load(engine, a)  # restore; the waiting request's content is no longer pinned now
    assert set(engine.collective_rpc("lofit_list")[0]) >= {a.name}


def test_new_adapters_do_not_recompile_the_model(engine, adapters, tmp_path):
    from vllm.compilation.counter import compilation_counter

    run(engine, [(PROMPTS[0], {"lofit_adapter": "truthfulqa"})])
    before = compilation_counter.num_graphs_seen, compilation_counter.num_backend_compilations
    fresh = LofitAdapter(heads=adapters["b"].heads, offsets=-adapters["b"].offsets,
                         base_model=adapters["b"].base_model, name="fresh")
    fresh.path = fresh.save(tmp_path / "fresh")
    load(engine, fresh)
    run(engine, [(PROMPTS[0], {"lofit_adapter": "fresh"}), (PROMPTS[1], {"lofit_adapters": {"fresh": 2.0}})])
    assert (compilation_counter.num_graphs_seen, compilation_counter.num_backend_compilations) == before


def test_adapters_are_managed_through_collective_rpc(engine, adapters, tmp_path):
    from vllm import SamplingParams

    load(engine, adapters["a"])
    broken = tmp_path / "broken"
    broken.mkdir()
    with pytest.raises(Exception, match="adapter_config.json not found"):
        engine.collective_rpc("lofit_load", args=(str(broken),))
    assert engine.collective_rpc("lofit_list")[0]["truthfulqa"] == adapters["a"].content_sha256
    engine.collective_rpc("lofit_unload", args=("truthfulqa",))
    assert "truthfulqa" not in engine.collective_rpc("lofit_list")[0]
    from lofit.vllm.admission import AdmissionError

    with pytest.raises(AdmissionError, match=r"unknown adapter\(s\) \['truthfulqa'\]"):
        engine.generate(PROMPTS[0], SamplingParams(max_tokens=2, extra_args={"lofit_adapter": "truthfulqa"}),
                        use_tqdm=False)
    load(engine, adapters["a"])
    assert texts(run(engine, [(PROMPTS[0], None)]))[0], "the engine keeps serving after a failed load and an unload"


def test_an_adapter_of_another_model_is_refused(engine, adapters, stories_identity, tmp_path):
    wrong = LofitAdapter(heads=torch.tensor([(0, 0)]), offsets=torch.ones(1, stories_identity.head_dim),
                         base_model=stories_identity, name="stories")
    wrong.save(tmp_path / "stories")
    with pytest.raises(Exception, match="differs from the model in use"):
        engine.collective_rpc("lofit_load", args=(str(tmp_path / "stories"),))
    assert "stories" not in engine.collective_rpc("lofit_list")[0]


@pytest.mark.parametrize("extra_args", [{"lofit_adapter": 3}, {"lofit_adapters": {"a": "strong"}},
                                        {"lofit_adapter": "a", "lofit_adapters": {"b": 1.0}},
                                        {"lofit_adapter": "truthfulqa", "lofit_scale": math.nan}])
def test_malformed_adapter_requests_are_refused_at_admission(engine, extra_args):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError  # what the OpenAI server turns into HTTP 400

    with pytest.raises(VLLMValidationError, match="invalid LoFiT adapter request"):
        engine.generate(PROMPTS[0], SamplingParams(max_tokens=2, extra_args=extra_args), use_tqdm=False)
    assert texts(run(engine, [(PROMPTS[0], None)]))[0], "the engine keeps serving"


def test_after_an_admission_error_the_engine_has_no_stray_request(engine):
    from lofit.vllm.admission import AdmissionError

    with pytest.raises(AdmissionError, match="unknown adapter"):
        run(engine, [(PROMPTS[0], {"lofit_adapter": "no-such-adapter"})])
    assert not engine.llm_engine.has_unfinished_requests()
    assert texts(run(engine, [(PROMPTS[0], None)]))[0]
