"""Where the time goes at high concurrency: the plugin on vLLM against the transformers reference path.

    python -m bench.profile_gap                       # batch 64, 128 prompt + 32 output tokens, 64 adapters
    python -m bench.profile_gap --batch 16 --out bench/results/profile-16

Each path generates the same batch (random prompt ids, one distinct LoFiT adapter per row, greedy,
``ignore_eos``) once to warm up and once under ``torch.profiler``, in a subprocess of its own so that no
engine or thread setting leaks between paths:

* ``plugin-compiled`` — vLLM (engine in-process, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``) as it serves:
  torch.compile; the gather-add is fused into inductor kernels, so its share cannot be read off;
* ``plugin-eager`` — the same engine with ``enforce_eager=True``; every ``o_proj`` gather-add runs under a
  ``lofit::gather_add`` profiler label, so its share of the step is measured;
* ``reference`` — transformers ``generate`` with ``lofit.intervene.apply_adapters`` (the reference path),
  on the same number of torch threads (``--threads``, by default what a served vLLM CPU worker binds: all
  cores but one).

Writes ``profile.json`` and ``profile.md`` (time by category: GEMM, attention, LoFiT gather-add, everything
else; and the top operators of each path) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import greedy_generate, machine_info, make_adapters, md_table, random_token_prompts
from lofit.default_model import default_model_dir

PATHS = ("plugin-compiled", "plugin-eager", "reference")
LOFIT_LABEL = "lofit::gather_add"
# Operator-name fragments of each category (lower case); first match wins, in this order.
CATEGORIES = {
    "LoFiT gather-add": (LOFIT_LABEL,),
    "attention": ("attention", "attn", "sdpa", "scaled_dot_product", "softmax", "rotary", "reshape_and_cache"),
    "GEMM (linear layers, lm_head)": ("mm", "linear", "matmul", "gemm", "onednn", "mkldnn"),
}


def category(name: str) -> str:
    lowered = name.lower()
    return next((cat for cat, keys in CATEGORIES.items() if any(k in lowered for k in keys)), "other")


def summarise(profile: torch.profiler.profile, wall_s: float, tokens: int) -> dict:
    """Self CPU time by category (the gather-add label by its total: its index_select and add inside it)."""
    events = profile.key_averages()
    self_us = {e.key: e.self_cpu_time_total for e in events}
    lofit_us = sum(e.cpu_time_total for e in events if e.key == LOFIT_LABEL)
    inside_lofit = lofit_us - self_us.get(LOFIT_LABEL, 0.0)  # child ops, counted once under the label
    by_cat: dict[str, float] = {cat: 0.0 for cat in [*CATEGORIES, "other"]}
    for name, us in self_us.items():
        by_cat[category(name)] += us
    by_cat["LoFiT gather-add"] = lofit_us
    by_cat["other"] -= inside_lofit  # the index_select/add under the label are not "other" as well
    total = sum(self_us.values())
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {"wall_s": wall_s, "output_tokens": tokens, "output_tokens_per_s": tokens / wall_s,
            "profiled_cpu_s": total / 1e6, "threads": torch.get_num_threads(),
            "share": {cat: us / total for cat, us in by_cat.items()},
            "top_ops": [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count,
                         "category": category(e.key)} for e in top]}


def run_plugin(args: argparse.Namespace, paths: list[str], prompts: list[list[int]], eager: bool) -> dict:
    from vllm import SamplingParams

    from lofit.vllm import bank as bank_module
    from lofit.vllm.offline import LofitLLM

    if eager:  # label every gather-add (eager only: the compiled graph keeps no Python in the step)
        apply = bank_module.AdapterBank.apply

        def labelled(self, layer, attn_output):
            with torch.profiler.record_function(LOFIT_LABEL):
                return apply(self, layer, attn_output)

        bank_module.AdapterBank.apply = labelled
    llm = LofitLLM(args.model, adapters=paths, dtype=args.dtype, max_model_len=1024, max_num_seqs=args.batch,
                   seed=0, gpu_memory_utilization=0.1, enforce_eager=eager)
    params = SamplingParams(temperature=0, max_tokens=args.output_tokens, ignore_eos=True)
    names = [Path(p).name for p in paths]
    batch = [{"prompt_token_ids": ids} for ids in prompts]

    def once() -> tuple[float, int]:
        start = time.perf_counter()
        outputs = llm.generate(batch, params, adapters=[names[i % len(names)] for i in range(len(batch))])
        return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outputs)

    once()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        wall, tokens = once()
    return summarise(prof, wall, tokens)


def run_reference(args: argparse.Namespace, paths: list[str], prompts: list[list[int]], threads: int) -> dict:
    from transformers import AutoModelForCausalLM

    from lofit.adapter import load_adapter
    from lofit.intervene import apply_adapters

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    adapters = [load_adapter(paths[i % len(paths)]) for i in range(len(prompts))]
    ids = torch.tensor(prompts)

    def once() -> tuple[float, int]:
        with apply_adapters(model, adapters), torch.inference_mode():
            start = time.perf_counter()
            out = greedy_generate(model, ids, args.output_tokens)
            return time.perf_counter() - start, (out.shape[1] - ids.shape[1]) * len(prompts)

    once()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        wall, tokens = once()
    return summarise(prof, wall, tokens)


def child(args: argparse.Namespace) -> None:
    """One path, in this (fresh) process; prints its summary as the last line of JSON."""
    paths = sorted(str(p) for p in Path(args.adapters).iterdir())
    config = json.loads((Path(args.model) / "config.json").read_text())
    prompts = random_token_prompts(config["vocab_size"], args.batch, args.prompt_tokens, seed=7)
    if args.path == "reference":
        result = run_reference(args, paths, prompts, args.threads)
    else:
        result = run_plugin(args, paths, prompts, eager=args.path == "plugin-eager")
    print("RESULT " + json.dumps(result), flush=True)


def report(results: dict[str, dict], args: argparse.Namespace) -> str:
    cats = [*CATEGORIES, "other"]
    rows = [[path, r["threads"], r["output_tokens_per_s"], *[100 * r["share"][c] for c in cats]]
            for path, r in results.items()]
    lines = [f"# Profile at batch {args.batch} ({args.prompt_tokens} prompt + {args.output_tokens} output tokens, "
             f"{args.batch} distinct adapters, {args.dtype})", "",
             md_table(["path", "torch threads", "tok/s", *[f"{c} %" for c in cats]], rows), ""]
    if "reference" in results:
        reference = results["reference"]
        for path in ("plugin-compiled", "plugin-eager"):
            if path in results:
                r = results[path]
                gemm_s = r["share"]["GEMM (linear layers, lm_head)"] * r["profiled_cpu_s"]
                ratio = r["output_tokens_per_s"] / reference["output_tokens_per_s"]
                lines.append(f"{path} / reference: **{ratio:.2f}x**"
                             f"; ceiling if everything but its GEMMs ({gemm_s:.1f} s) took no time: "
                             f"{reference['wall_s'] / gemm_s:.2f}x  ")
        lines.append("")
    for path, r in results.items():
        lines += [f"## Top operators: {path}", "",
                  md_table(["op", "category", "self CPU ms", "calls"],
                           [[o["op"][:70], o["category"], o["self_cpu_ms"], o["calls"]] for o in r["top_ops"]]), ""]
    return "\n".join(lines)


def set_environment() -> None:
    """vLLM's settings for the paths (inherited by their subprocesses); before any engine starts."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine stays in this process, so the
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # profiler sees the model's operators


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_gap", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(default_model_dir()))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {PATHS}")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="torch threads of every path (default: what a served vLLM CPU worker binds)")
    parser.add_argument("--out", default="bench/results/profile")
    parser.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)  # internal: run one path
    parser.add_argument("--adapters", help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_environment()
    if args.path:
        return child(args)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="lofit-profile-") as work:
        make_adapters(Path(args.model), args.batch, Path(work) / "adapters")
        for path in args.paths.split(","):
            command = [sys.executable, "-m", "bench.profile_gap", "--path", path,
                       "--adapters", str(Path(work) / "adapters"),
                       *[f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                         ("model", "batch", "prompt_tokens", "output_tokens", "dtype", "threads")]]
            print(f"[profile] {path} ...", flush=True)
            # OMP_NUM_THREADS before torch starts: vLLM's in-process worker allows no set_num_threads later
            done = subprocess.run(command, capture_output=True, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            (out / f"{path}.log").write_text(done.stdout + done.stderr)
            line = next((x for x in reversed(done.stdout.splitlines()) if x.startswith("RESULT ")), None)
            if done.returncode or line is None:
                raise SystemExit(f"{path} failed ({done.returncode}); see {out / f'{path}.log'}")
            results[path] = json.loads(line[len("RESULT "):])
    text = report(results, args)
    (out / "profile.md").write_text(text + "\n")
    (out / "profile.json").write_text(json.dumps({"machine": machine_info(), "args": vars(args),
                                                  "results": results}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
