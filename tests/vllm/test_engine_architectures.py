"""Every checked decoder family in a real vLLM engine (eager mode), and tensor parallelism.

A small random checkpoint of each family of :data:`lofit.heads.SUPPORTED_ARCHITECTURES` (head_dim 32, the CPU
attention's minimum) is served with its ``Lofit<Arch>`` wrapper; a mixed batch (no adapter, adapter A, adapter
B, A at strength 0.5, A+B) must give, for every prompt, exactly the greedy tokens of the transformers reference
path. The Llama one is also served with tensor-parallel size 2 (each rank holds its own heads' columns).
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from lofit.adapter import LofitAdapter  # noqa: E402
from lofit.default_model import default_model_dir  # noqa: E402
from lofit.heads import identity_from_checkpoint  # noqa: E402
from lofit.intervene import apply_adapters, combine  # noqa: E402

PROMPTS = ["Once upon a time there was a little girl who", "The capital of France is",
           "Q: What is the boiling point of water? A:"]
NEW_TOKENS = 8
SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=512, initializer_range=0.1,
             tie_word_embeddings=False)


# family -> (transformers config class, model class, config settings beyond SHAPE); sliding windows are set
# longer than any sequence here, so both paths attend the same way and only the steering can differ
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"sliding_window": None}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"sliding_window": None}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2,
                                                           "moe_intermediate_size": 64, "sliding_window": None}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"query_pre_attn_scalar": 32, "sliding_window": 64,
                                                     "tie_word_embeddings": True}),  # vLLM's Gemmas are tied
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"query_pre_attn_scalar": 32, "sliding_window": 64,
                                                         "tie_word_embeddings": True}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}),
}


def tiny_checkpoint(directory: Path, family: str) -> Path:
    """A random checkpoint of ``family`` with SmolLM2's tokenizer, saved in float32."""
    import transformers

    config_name, model_name, extra = FAMILIES[family]
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir())
    config = getattr(transformers, config_name)(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2,
                                                pad_token_id=0, **{**SHAPE, **extra})
    torch.manual_seed(list(FAMILIES).index(family) + 1)
    model = getattr(transformers, model_name)(config).to(torch.float32)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def random_adapter(model_dir: Path, name: str, heads: list[tuple[int, int]], seed: int) -> LofitAdapter:
    identity = identity_from_checkpoint(model_dir, name=model_dir.name)
    assert identity.head_dim == 32
    return LofitAdapter.random(identity, name, heads, seed=seed, scale=2.0)


CASES = [  # (extra_args, [(adapter key, strength)])
    (None, []),
    ({"lofit_adapter": "A"}, [("A", 1.0)]),
    ({"lofit_adapter": "B"}, [("B", 1.0)]),
    ({"lofit_adapter": "A", "lofit_scale": 0.5}, [("A", 0.5)]),
    ({"lofit_adapters": {"A": 1.0, "B": 1.0}}, [("A", 1.0), ("B", 1.0)]),
]


def reference_tokens(model_dir: Path, adapters: dict[str, LofitAdapter]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for i, (_, parts) in enumerate(CASES):
        ids = tokenizer(PROMPTS[i % len(PROMPTS)], return_tensors="pt").input_ids
        chosen = combine([(adapters[key], strength) for key, strength in parts]) if parts else None
        with torch.no_grad(), apply_adapters(model, chosen):
            generated = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        out.append(generated[0, ids.shape[1]:].tolist())
    return out


def engine_tokens(model_dir: Path, architecture: str, adapters: dict[str, LofitAdapter], tmp_path: Path,
                  **engine_args) -> list[list[int]]:
    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    llm = LLM(str(model_dir), hf_overrides={"architectures": [architecture]}, dtype="float32",
              gpu_memory_utilization=0.1, max_model_len=256, max_num_seqs=8, enforce_eager=True, seed=0,
              **engine_args)
    try:
        for key, adapter in adapters.items():
            path = adapter.save(tmp_path / key)
            [info] = llm.collective_rpc("lofit_load", args=(str(path),))[:1]
            assert info["name"] == key
        params = [SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, extra_args=x)
                  for x, _ in CASES]
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(CASES))]
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        del llm
        gc.collect()
        destroy_model_parallel()
        destroy_distributed_environment()


@pytest.fixture(scope="module", autouse=True)
def _needs_tokenizer(prepared_model_dir):
    pass  # the tiny checkpoints borrow the default model's tokenizer


def test_every_checked_family_is_listed_here():
    from lofit.heads import SUPPORTED_ARCHITECTURES

    assert sorted(model for _, model, _ in FAMILIES.values()) == sorted(SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_architecture_matches_the_reference_in_a_mixed_batch(family, tmp_path):
    model_dir = tiny_checkpoint(tmp_path / family, family)
    wrapper = "Lofit" + FAMILIES[family][1]
    adapters = {"A": random_adapter(model_dir, "A", [(0, 1), (1, 3), (2, 0)], seed=1),
                "B": random_adapter(model_dir, "B", [(0, 1), (2, 2)], seed=2)}
    expected = reference_tokens(model_dir, adapters)
    assert len({tuple(t) for t in expected}) >= 4, "the adapters must change the greedy tokens"
    assert engine_tokens(model_dir, wrapper, adapters, tmp_path) == expected


def test_tensor_parallel_ranks_steer_their_own_heads(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank (the default binds by NUMA node)
    model_dir = tiny_checkpoint(tmp_path / "llama", "llama")
    adapters = {"A": random_adapter(model_dir, "A", [(0, 1), (1, 3), (2, 0)], seed=1),
                "B": random_adapter(model_dir, "B", [(0, 1), (2, 2)], seed=2)}
    expected = reference_tokens(model_dir, adapters)
    assert engine_tokens(model_dir, "LofitLlamaForCausalLM", adapters, tmp_path, tensor_parallel_size=2,
                         distributed_executor_backend="mp") == expected


def test_lora_in_the_same_engine_is_refused_at_start(tmp_path):
    from vllm import LLM

    model_dir = tiny_checkpoint(tmp_path / "llama", "llama")
    with pytest.raises(Exception, match=r"LoFiT cannot steer correctly with LoRA \(--enable-lora\)"):
        LLM(str(model_dir), hf_overrides={"architectures": ["LofitLlamaForCausalLM"]}, dtype="float32",
            gpu_memory_utilization=0.1, max_model_len=256, max_num_seqs=8, enforce_eager=True, enable_lora=True)
