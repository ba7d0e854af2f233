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
from lofit.hf import load_model  # noqa: E402
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
# DeepSeek-V2 (multi-head latent attention: o_proj takes heads x v_head_dim); the CPU MLA kernel supports only
# a latent width of 576 (kv_lora_rank 512 + qk_rope_head_dim 64)
MLA = ("DeepseekV2Config", "DeepseekV2ForCausalLM", {
    "num_key_value_heads": 4, "kv_lora_rank": 512, "q_lora_rank": None, "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 64, "v_head_dim": 32, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "moe_intermediate_size": 64, "first_k_dense_replace": 1, "n_shared_experts": 1, "topk_method": "greedy",
    "n_group": 1, "topk_group": 1})


def tiny_checkpoint(directory: Path, family: str) -> Path:
    """A random checkpoint of ``family`` with SmolLM2's tokenizer, saved in float32."""
    import transformers

    config_name, model_name, extra = MLA if family == "deepseek_v2" else FAMILIES[family]
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir())
    config = getattr(transformers, config_name)(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2,
                                                pad_token_id=0, **{**SHAPE, **extra})
    torch.manual_seed(list(FAMILIES).index(family) + 1 if family in FAMILIES else 99)
    model = getattr(transformers, model_name)(config).to(torch.float32)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_vision_language_checkpoint(directory: Path) -> Path:
    """A random Idefics3 (SmolVLM's architecture) checkpoint: a 2-layer SigLIP-style vision encoder, whose
    attention has ``out_proj`` layers of its own, and a Llama text decoder of :data:`SHAPE`; with a processor."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir(), extra_special_tokens={
        "image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
        "global_image_token": "<global-img>"})
    text = transformers.LlamaConfig(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                    **SHAPE)
    vision = transformers.Idefics3VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=32, patch_size=16)
    config = transformers.Idefics3Config(text_config=text, vision_config=vision, scale_factor=2,
                                         image_token_id=tokenizer.image_token_id, tie_word_embeddings=False)
    torch.manual_seed(11)
    transformers.Idefics3ForConditionalGeneration(config).to(torch.float32).save_pretrained(directory)
    image_processor = transformers.Idefics3ImageProcessor(size={"longest_edge": 32}, do_image_splitting=False,
                                                           max_image_size={"longest_edge": 32})
    transformers.Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=1,
                                   chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}",
                                   ).save_pretrained(directory)
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
    tokenizer, model = load_model(model_dir, "float32", "cpu")
    model.eval()
    out = []
    for i, (_, parts) in enumerate(CASES):
        ids = tokenizer(PROMPTS[i % len(PROMPTS)], return_tensors="pt").input_ids
        chosen = combine([(adapters[key], strength) for key, strength in parts]) if parts else None
        with torch.no_grad(), apply_adapters(model, chosen):
            generated = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        out.append(generated[0, ids.shape[1]:].tolist())
    return out


def start_engine(model_dir: Path, architecture: str, **engine_args):
    """A ``vllm.LLM`` for ``model_dir`` served as ``architecture``; a refused start cleans up vLLM's distributed
    state (left behind otherwise), so the next engine of the module can start."""
    from vllm import LLM
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    try:
        return LLM(str(model_dir), **{**dict(hf_overrides={"architectures": [architecture]}, dtype="float32",
                                             gpu_memory_utilization=0.1, max_model_len=256, max_num_seqs=8,
                                             enforce_eager=True, seed=0), **engine_args})
    except BaseException:
        gc.collect()
        destroy_model_parallel()
        destroy_distributed_environment()
        raise


def engine_tokens(model_dir: Path, architecture: str, adapters: dict[str, LofitAdapter], tmp_path: Path,
                  by_bytes: bool = False, **engine_args) -> list[list[int]]:
    """Greedy tokens of :data:`CASES` from an engine, the adapters loaded by path (``lofit_load``) or, with
    ``by_bytes``, as their files' bytes (``lofit_load_bytes``: how lofit-serve loads, on every rank)."""
    from vllm import SamplingParams

    llm = start_engine(model_dir, architecture, **engine_args)
    try:
        for key, adapter in adapters.items():
            if by_bytes:
                files = adapter.files()
                infos = llm.collective_rpc("lofit_load_bytes", args=(key, files["adapter_config.json"],
                                                                     files["adapter.safetensors"]))
                assert len(infos) == engine_args.get("tensor_parallel_size", 1)  # every rank loaded it
                assert {i["content_sha256"] for i in infos} == {adapter.content_sha256}
            else:
                path = adapter.save(tmp_path / key)
                infos = llm.collective_rpc("lofit_load", args=(str(path),))
            assert infos[0]["name"] == key
        params = [SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, extra_args=x)
                  for x, _ in CASES]
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(CASES))]
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        stop_engine(llm)


def stop_engine(llm) -> None:
    """Shut ``llm`` down so that the next engine of this process can start."""
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    del llm
    gc.collect()
    destroy_model_parallel()
    destroy_distributed_environment()


@pytest.fixture(scope="module", autouse=True)
def _needs_tokenizer(prepared_model_dir):
    pass  # the tiny checkpoints borrow the default model's tokenizer


def test_every_checked_family_is_listed_here():
    from lofit.heads import SUPPORTED_ARCHITECTURES

    checked = [model for _, model, _ in FAMILIES.values()] + ["Idefics3ForConditionalGeneration"]
    assert sorted(checked) == sorted(SUPPORTED_ARCHITECTURES)


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
    assert engine_tokens(model_dir, "LofitLlamaForCausalLM", adapters, tmp_path, by_bytes=True, tensor_parallel_size=2,
                         distributed_executor_backend="mp") == expected


def test_lora_in_the_same_engine_is_refused_at_start(tmp_path):
    model_dir = tiny_checkpoint(tmp_path / "llama", "llama")
    with pytest.raises(Exception, match=r"LoFiT cannot steer correctly with LoRA \(--enable-lora\)"):
        start_engine(model_dir, "LofitLlamaForCausalLM", enable_lora=True)


def test_mla_is_served_exactly_or_refused_by_the_self_test(tmp_path):
    """DeepSeek-V2's MLA: the wrapper finds every layer's o_proj (heads x v_head_dim wide) and the engine then
    either serves the mixed batch exactly or refuses to start; it never serves a wrong batch. vLLM 0.32's CPU
    MLA backend gives different tokens to identical prompts in one batch, even without LoFiT, so on CPU the
    self-test refuses (a GPU's MLA backends are expected to pass it)."""
    from lofit.vllm.selftest import SelfTestError

    model_dir = tiny_checkpoint(tmp_path / "deepseek_v2", "deepseek_v2")
    adapters = {"A": random_adapter(model_dir, "A", [(0, 1), (1, 3), (2, 0)], seed=1),
                "B": random_adapter(model_dir, "B", [(0, 1), (2, 2)], seed=2)}
    expected = reference_tokens(model_dir, adapters)
    assert len({tuple(t) for t in expected}) >= 4, "the adapters must change the greedy tokens"
    try:
        got = engine_tokens(model_dir, "LofitDeepseekV2ForCausalLM", adapters, tmp_path,
                            attention_backend="CPU_MLA")  # the AMX MLA backend needs bf16 weights
    except SelfTestError as error:
        assert "steering leaks across requests" in str(error)
    else:
        assert got == expected


def test_a_restart_with_the_compile_cache_steers_exactly_and_never_takes_the_stock_graph(tmp_path, monkeypatch):
    """vLLM's compile cache (``VLLM_CACHE_ROOT/torch_compile_cache/torch_aot_compile/<key>``): a compiled engine
    restarted on the same cache finds its own entry (same key) and serves the mixed batch exactly; the stock
    model's entry has another key, so a graph without the steering is never loaded for a LoFiT model.
    vLLM 0.32's CPU build cannot load its own AOT artefacts ("'function' object has no attribute
    'finalize_loading'", stock models too) and compiles again; where it can, the loaded graph is checked."""
    import vllm.envs
    from vllm.compilation.counter import compilation_counter

    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "cache"))
    vllm.envs.disable_envs_cache()  # an earlier engine of this process froze vLLM's environment
    entries = tmp_path / "cache" / "torch_compile_cache" / "torch_aot_compile"
    model_dir = tiny_checkpoint(tmp_path / "llama", "llama")
    adapters = {"A": random_adapter(model_dir, "A", [(0, 1), (1, 3), (2, 0)], seed=1),
                "B": random_adapter(model_dir, "B", [(0, 1), (2, 2)], seed=2)}
    expected = reference_tokens(model_dir, adapters)
    compiled = {"enforce_eager": False}

    assert engine_tokens(model_dir, "LofitLlamaForCausalLM", adapters, tmp_path, **compiled) == expected
    steered_key = {p.name for p in entries.iterdir()}
    assert len(steered_key) == 1, "the first start must save its compiled graph"
    loaded = compilation_counter.num_aot_artifacts_loaded
    assert engine_tokens(model_dir, "LofitLlamaForCausalLM", adapters, tmp_path, **compiled) == expected
    assert {p.name for p in entries.iterdir()} == steered_key, "a restart must look up the same entry"
    print(f"restart loaded the compiled graph: {compilation_counter.num_aot_artifacts_loaded > loaded}")

    vllm.envs.disable_envs_cache()
    stop_engine(start_engine(model_dir, "LlamaForCausalLM", **compiled))
    assert len({p.name for p in entries.iterdir()} - steered_key) == 1, "the stock model must get its own entry"


def _steered_modules(worker) -> dict[str, str]:
    return {name: type(module).__name__ for name, module in worker.model_runner.model.named_modules()
            if name.endswith(("o_proj", "out_proj"))}


def test_a_vision_language_checkpoint_steers_its_text_decoder_only(tmp_path):
    """Idefics3 (SmolVLM) served with its vision encoder built: only the text decoder's o_proj layers are
    steered (the encoder's out_proj layers keep vLLM's class), and text requests in a mixed batch equal the
    transformers reference (which loads it as an image-text-to-text model)."""
    model_dir = tiny_vision_language_checkpoint(tmp_path / "idefics3")
    adapters = {"A": random_adapter(model_dir, "A", [(0, 1), (1, 3), (2, 0)], seed=1),
                "B": random_adapter(model_dir, "B", [(0, 1), (2, 2)], seed=2)}
    expected = reference_tokens(model_dir, adapters)
    assert len({tuple(t) for t in expected}) >= 4, "the adapters must change the greedy tokens"
    llm = start_engine(model_dir, "LofitIdefics3ForConditionalGeneration")
    try:
        [projections] = llm.collective_rpc(_steered_modules)
    finally:
        stop_engine(llm)
    text = {f"model.text_model.layers.{i}.self_attn.o_proj" for i in range(3)}
    vision = {name for name in projections if "vision_model" in name}
    assert len(vision) == 2, f"the vision encoder must be built: {projections}"
    assert {name for name, cls in projections.items() if cls.startswith("Lofit")} == text
    assert engine_tokens(model_dir, "LofitIdefics3ForConditionalGeneration", adapters, tmp_path) == expected
