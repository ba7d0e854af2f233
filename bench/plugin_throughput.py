"""Serving cost of per-request steering: stock vLLM against the LoFiT plugin with 0, 1, 16 and 64 distinct adapters.

Two engines run side by side (each engine core in its own process): stock vLLM serving the checkpoint as
``LlamaForCausalLM``, and the same checkpoint under ``LofitLlamaForCausalLM``. Each round sends one batch of
``--requests`` concurrent requests (fixed prompt and output lengths, ``ignore_eos``) to every variant in turn,
so the variants are interleaved in time; prompts differ per request and per round, so no variant gets
prefix-cache hits the others do not. The first round warms up and is dropped; the median over the remaining
rounds is reported, with the ratios the plugin is judged by.

    python -m bench.plugin_throughput [--model DIR] [--requests 64] [--prompt-tokens 64] [--output-tokens 32]
                                      [--rounds 4] [--out bench/results/plugin_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import ADAPTER_HEADS, machine_info, make_adapters, random_token_prompts
from lofit.default_model import default_model_dir
from lofit.vllm.contract import RPC_LOAD, extra_args_for

VARIANTS = ("stock", "plugin, no adapter", "plugin, 1 adapter", "plugin, 16 distinct", "plugin, 64 distinct")


def extra_args(variant: str, index: int) -> dict | None:
    if variant in ("stock", "plugin, no adapter"):
        return None
    distinct = {"plugin, 1 adapter": 1, "plugin, 16 distinct": 16, "plugin, 64 distinct": 64}[variant]
    return extra_args_for(f"bench{index % distinct:02d}")


def run_batch(llm, variant: str, round_index: int, args, vocab: int) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=ids)
               for ids in random_token_prompts(vocab, args.requests, args.prompt_tokens, 1000 * round_index + 1)]
    params = [SamplingParams(temperature=0, max_tokens=args.output_tokens, ignore_eos=True,
                             extra_args=extra_args(variant, i)) for i in range(args.requests)]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert tokens == args.requests * args.output_tokens
    return {"seconds": seconds, "output_tokens_per_s": tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.plugin_throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=default_model_dir())
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4, help="rounds including the warm-up round")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=Path("bench/results/plugin_throughput.json"))
    args = parser.parse_args()
    from vllm import LLM

    from lofit.vllm.architectures import cpu_engine_defaults

    common = dict(dtype=args.dtype, max_model_len=args.prompt_tokens + args.output_tokens, max_num_seqs=args.requests,
                  seed=0, **cpu_engine_defaults(default_kv_cache_gib=2))
    engines = {"stock": LLM(str(args.model), **common),
               "plugin": LLM(str(args.model), hf_overrides={"architectures": ["LofitLlamaForCausalLM"]}, **common)}
    with tempfile.TemporaryDirectory() as tmp:
        for path in make_adapters(args.model, 64, Path(tmp)):
            engines["plugin"].collective_rpc(RPC_LOAD, args=(path,))
    vocab = engines["stock"].get_tokenizer().vocab_size

    samples: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for round_index in range(args.rounds):
        for variant in VARIANTS:
            llm = engines["stock" if variant == "stock" else "plugin"]
            result = run_batch(llm, variant, round_index, args, vocab)
            if round_index > 0:
                samples[variant].append(result)
            print(f"round {round_index} {variant:22s} {result['output_tokens_per_s']:8.1f} tok/s", flush=True)

    table = {v: statistics.median(s["output_tokens_per_s"] for s in samples[v]) for v in VARIANTS}
    ratios = {"16 distinct / stock": table["plugin, 16 distinct"] / table["stock"],
              "64 distinct / 1 adapter": table["plugin, 64 distinct"] / table["plugin, 1 adapter"],
              "no adapter / stock": table["plugin, no adapter"] / table["stock"]}
    goals = {"16 distinct / stock": 0.97, "64 distinct / 1 adapter": 0.97}
    print(f"\n| variant | output tok/s (median of {args.rounds - 1}) |\n|---|---|")
    for variant in VARIANTS:
        print(f"| {variant} | {table[variant]:.1f} |")
    print("\n| ratio | measured | goal |\n|---|---|---|")
    for name, value in ratios.items():
        print(f"| {name} | {value:.3f} | {'≥ ' + str(goals[name]) if name in goals else '—'} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": machine_info(),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "adapter_heads": ADAPTER_HEADS,
        "samples": samples, "median_output_tokens_per_s": table, "ratios": ratios, "goals": goals,
    }, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
