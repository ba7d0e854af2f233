"""The LoFiT model wrapper inside a real vLLM engine (the CPU build runs the V1 model runner).

One engine per module (start-up costs 1-2 minutes here). Requests choose adapters through
``SamplingParams.extra_args``; the V1 runner hook gives each token its request's bank row.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from lofit.adapter import load_adapter  # noqa: E402
from lofit.intervene import apply_adapters  # noqa: E402
from lofit.models import default_model_dir, is_prepared  # noqa: E402

PROMPTS = ["Q: Can pigs fly? A:", "Q: What happens if you crack your knuckles a lot? A:"]
ADAPTER = default_model_dir().parents[1] / "adapters" / "truthfulqa"


@pytest.fixture(scope="module")
def engine():
    if not is_prepared(default_model_dir()):
        pytest.skip("the default model is not prepared (run scripts/setup.sh)")
    from vllm import LLM

    from lofit.vllm.bank import active_bank

    llm = LLM(str(default_model_dir()), hf_overrides={"architectures": ["LofitLlamaForCausalLM"]},
              dtype="float32", gpu_memory_utilization=0.1, max_model_len=512, max_num_seqs=8,
              enable_prefix_caching=False, seed=0,
              worker_extension_cls="lofit.vllm.worker.LofitWorkerExtension",
              logits_processors=["lofit.vllm.admission:LofitRequestValidator"])
    yield llm, active_bank()
    del llm


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(default_model_dir())


def greedy_reference(reference, adapter=None, strength: float = 1.0) -> list[str]:
    model, tokenizer = reference
    texts = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            if adapter is None:
                out = model.generate(ids, max_new_tokens=12, do_sample=False)
            else:
                with apply_adapters(model, adapter, strengths=[strength]):
                    out = model.generate(ids, max_new_tokens=12, do_sample=False)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts


def generate(llm, extra_args: list[dict | None]) -> list[str]:
    from vllm import SamplingParams

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(extra_args))]
    params = [SamplingParams(temperature=0, max_tokens=12, extra_args=x) for x in extra_args]
    return [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]


def test_unsteered_engine_equals_the_plain_model(engine, reference):
    llm, _ = engine
    assert generate(llm, [None, None]) == greedy_reference(reference)


def test_each_request_gets_its_own_adapter_in_one_batch(engine, reference):
    llm, _ = engine
    adapter = load_adapter(ADAPTER)
    [loaded] = llm.collective_rpc("lofit_load", args=(str(ADAPTER),))
    assert loaded == {"name": "truthfulqa", "content_sha256": adapter.content_sha256, "num_heads": 8}
    name = adapter.name
    outputs = generate(llm, [{"lofit_adapter": name, "lofit_scale": 4.0}, None, None,
                             {"lofit_adapters": {name: 4.0}}, {"lofit_adapter": name}, {"lofit_adapter": name}])
    plain = greedy_reference(reference)
    strong = greedy_reference(reference, adapter, strength=4.0)
    shipped = greedy_reference(reference, adapter)
    assert outputs == [strong[0], plain[1], plain[0], strong[1], shipped[0], shipped[1]]
    assert strong != plain, "strength 4 must change the greedy text"


def test_adapters_are_managed_through_collective_rpc(engine, tmp_path):
    llm, _ = engine
    [listed] = llm.collective_rpc("lofit_list")
    assert set(listed) <= {"truthfulqa"}
    broken = tmp_path / "broken"
    broken.mkdir()
    with pytest.raises(Exception, match="adapter_config.json not found"):
        llm.collective_rpc("lofit_load", args=(str(broken),))
    llm.collective_rpc("lofit_load", args=(str(ADAPTER),))
    assert llm.collective_rpc("lofit_list")[0] == {"truthfulqa": load_adapter(ADAPTER).content_sha256}
    generate(llm, [{"lofit_adapter": "truthfulqa"}])
    generate(llm, [None])  # the next step releases the finished request's row
    llm.collective_rpc("lofit_unload", args=("truthfulqa",))
    assert llm.collective_rpc("lofit_list") == [{}]
    assert generate(llm, [None])[0], "the engine keeps serving after a failed load and an unload"


@pytest.mark.parametrize("extra_args", [{"lofit_adapter": 3}, {"lofit_adapters": {"a": "strong"}},
                                        {"lofit_adapter": "a", "lofit_adapters": {"b": 1.0}}])
def test_malformed_adapter_requests_are_refused_at_admission(engine, extra_args):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError  # what the OpenAI server turns into HTTP 400

    llm, _ = engine
    with pytest.raises(VLLMValidationError, match="invalid LoFiT adapter request"):
        llm.generate(PROMPTS[0], SamplingParams(max_tokens=2, extra_args=extra_args), use_tqdm=False)
    assert generate(llm, [None])[0], "the engine keeps serving"
