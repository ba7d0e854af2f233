"""vLLM's own benchmark client against ``lofit-serve`` and against stock ``vllm serve``, interleaved in one run.

Both servers serve the same checkpoint with the same engine flags; ``lofit-serve`` holds 64 random adapters
(8 heads each, the shipped adapter's size). Each round runs ``vllm bench serve`` (``python -m bench.vllm_cli``) three
times, one variant after the other so that the machine's drift hits all of them alike:

* ``stock``: stock ``vllm serve``, no adapter;
* ``16 distinct``: ``lofit-serve`` with the adapters as models, 16 distinct adapters round-robin
  (``--lora-modules``, vLLM's own way of spreading requests over adapters);
* ``64 distinct``: the same with 64.

The first round warms up and is dropped; the table gives the median of the other rounds, and the ratios the
server is judged by: output throughput ≥ 0.97 of stock and TTFT p50 ≤ 1.05 of stock. Only one server is under
load at a time.

    python -m bench.vllm_bench_serve [--model DIR] [--prompts 64] [--concurrency 64] [--input-len 128]
                                     [--output-len 64] [--rounds 4] [--dtype bfloat16]
                                     [--out bench/results/vllm_bench_serve.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import machine_info, make_adapters, md_table
from lofit.default_model import default_model_dir
from server.launch import ServerProcess, free_port, lofit_serve_argv, stock_vllm_serve

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"stock": 0, "16 distinct": 16, "64 distinct": 64}  # name -> distinct adapters (0: stock vllm serve)
METRICS = ("output_throughput", "median_ttft_ms", "median_tpot_ms", "median_itl_ms", "completed")


def bench_serve(url: str, model: str, adapters: list[str], args: argparse.Namespace, seed: int,
                out: Path) -> dict:
    """One ``vllm bench serve`` run; its saved result."""
    command = [sys.executable, "-m", "bench.vllm_cli", "bench", "serve", "--backend", "openai",
               "--base-url", url, "--endpoint", "/v1/completions", "--model", model, "--tokenizer",
               str(args.model.resolve()),
               "--dataset-name", "random", "--random-input-len", str(args.input_len), "--random-output-len",
               str(args.output_len), "--num-prompts", str(args.prompts), "--max-concurrency", str(args.concurrency),
               "--ignore-eos", "--seed", str(seed), "--save-result", "--result-dir", str(out.parent),
               "--result-filename", out.name, "--percentile-metrics", "ttft,tpot,itl"]
    if adapters:
        command += ["--lora-modules", *adapters, "--lora-assignment", "round-robin"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": "bench-key"}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    if result.get("completed") != args.prompts:
        raise RuntimeError(f"{result.get('completed')} of {args.prompts} requests completed:\n{proc.stdout[-2000:]}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.vllm_bench_serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=default_model_dir())
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4, help="rounds, the first of which warms up")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kv-cache-gib", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "vllm_bench_serve.json")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the first warms up)")
    work = Path(tempfile.mkdtemp(prefix="vllm-bench-serve-"))
    adapters = [Path(p).name for p in make_adapters(args.model, max(VARIANTS.values()), work / "adapters")]
    engine = ["--dtype", args.dtype, "--max-model-len", str(args.input_len + args.output_len + 64), "--max-num-seqs",
              str(args.concurrency), "--seed", "0"]
    env = {"VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib)}
    base = "SmolLM2-135M-Instruct" if args.model.name == "SmolLM2-135M-Instruct" else args.model.name
    stock = stock_vllm_serve(["--model", str(args.model), "--served-model-name", base, *engine,
                              "--gpu-memory-utilization", "0.1"], work / "vllm-serve.log", env=env)
    port = free_port()
    lofit = ServerProcess(lofit_serve_argv(port, ["--model", str(args.model), "--adapters-dir", str(work / "adapters"),
                                                  "--api-key", "bench-key", "--kv-cache-gib", str(args.kv_cache_gib),
                                                  *engine]), port, work / "lofit-serve.log", name="lofit-serve",
                          env=env, cwd=REPO)
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    with stock, lofit:
        print(f"[bench] stock vllm serve ready in {stock.wait_ready():.0f} s; lofit-serve ready in "
              f"{lofit.wait_ready():.0f} s (logs in {work})", flush=True)
        for round_index in range(args.rounds):
            for name, distinct in VARIANTS.items():
                url = stock.url if distinct == 0 else lofit.url
                result = bench_serve(url, base, adapters[:distinct], args, 1000 + round_index,
                                     work / f"{name.replace(' ', '-')}-{round_index}.json")
                print(f"[bench] round {round_index} {name}: {result['output_throughput']:.1f} tok/s, TTFT p50 "
                      f"{result['median_ttft_ms']:.0f} ms", flush=True)
                if round_index:
                    results[name].append({k: result[k] for k in METRICS})
    median = {name: {k: statistics.median(r[k] for r in rounds) for k in METRICS} for name, rounds in results.items()}
    stock_m = median["stock"]
    ratios = {f"{name} / stock": {"throughput": median[name]["output_throughput"] / stock_m["output_throughput"],
                                  "ttft_p50": median[name]["median_ttft_ms"] / stock_m["median_ttft_ms"]}
              for name in VARIANTS if name != "stock"}
    rows = [[name, m["output_throughput"], m["median_ttft_ms"], m["median_tpot_ms"], m["median_itl_ms"]]
            for name, m in median.items()]
    print(md_table(["variant", "output tok/s", "TTFT p50 ms", "TPOT p50 ms", "ITL p50 ms"], rows))
    print(md_table(["ratio", "throughput (goal ≥ 0.97)", "TTFT p50 (goal ≤ 1.05)"],
                   [[k, v["throughput"], v["ttft_p50"]] for k, v in ratios.items()], digits=3))
    report = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "machine": machine_info(), "rounds": results, "median": median, "ratios": ratios}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"[bench] wrote {args.out}")


if __name__ == "__main__":
    main()
