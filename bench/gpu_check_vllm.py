"""The GPU check's vLLM part, for a machine where vLLM is installed (``scripts/gpu-check.sh`` runs it then).

1. **Self-test in bf16 with CUDA graphs.** ``LofitLLM`` starts the default model in bfloat16 with vLLM's
   default compilation (on a GPU: ``FULL_AND_PIECEWISE`` CUDA graphs); the engine's start-up self-test runs
   (three requests, four decode steps, a batch of 3, which a GPU pads to a captured size) and, on a GPU, must
   see a FULL CUDA-graph replay. A start that passes is the check; the replays counted are reported.
2. **One fidelity batch in fp32.** The default model in float32 with the shipped adapters: a mixed batch (none,
   A, B, A x 0.5, A + B; greedy, up to 16 tokens) must give the transformers reference path's text.

Prints a table, writes JSON (``--out``), exits 1 when a check fails. On a CPU it runs too (no graphs: the
replay count is 0 and not required), which is how the script itself is checked here.

    python -m bench.gpu_check_vllm --out gpu-check/vllm.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

PROMPTS = ["Q: What happens if you crack your knuckles a lot? A:", "Q: Can pigs fly? A:",
           "Q: Who was the first person to walk on the moon? A:"]
NEW_TOKENS = 16


def _cases(a: str, b: str) -> list[tuple[str, object]]:
    return [("none", None), (a, a), (b, b), (f"{a} x 0.5", {a: 0.5}), (f"{a} + {b}", {a: 1.0, b: 1.0})]


def _stop(llm) -> None:
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    del llm
    gc.collect()
    destroy_model_parallel()
    destroy_distributed_environment()


def self_test_bf16(model: str) -> dict:
    """Start the bf16 engine (its self-test runs at start); the FULL replays seen so far on every worker."""
    from lofit.vllm.architectures import cpu_engine_defaults
    from lofit.vllm.contract import RPC_FULL_GRAPH_REPLAYS
    from lofit.vllm.offline import LofitLLM

    started = time.perf_counter()
    try:
        llm = LofitLLM(model, dtype="bfloat16", max_model_len=512, max_num_seqs=16, **cpu_engine_defaults())
    except Exception as error:  # the self-test's refusal (or any start failure) is the result
        return {"ok": False, "error": f"{type(error).__name__}: {error}"}
    replays = llm.llm.collective_rpc(RPC_FULL_GRAPH_REPLAYS)
    cuda = torch.cuda.is_available()
    _stop(llm)
    return {"ok": not cuda or sum(replays) > 0, "full_graph_replays_per_worker": replays, "cuda": cuda,
            "start_s": round(time.perf_counter() - started, 1)}


def reference(model: str, adapters: dict, cases: list) -> list[str]:
    """Greedy text of every case on the transformers reference path (fp32, one prompt at a time, up to EOS)."""
    from lofit.adapter import load_adapter
    from lofit.hf import load_model
    from lofit.intervene import apply_adapters, combine
    from lofit.vllm.contract import extra_args_for, requested_weights

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer, hf = load_model(model, "float32", device)
    loaded = {name: load_adapter(path) for name, path in adapters.items()}
    out = []
    for i, (_, choice) in enumerate(cases):
        ids = tokenizer(PROMPTS[i % len(PROMPTS)], return_tensors="pt").input_ids.to(device)
        weights = requested_weights(extra_args_for(choice))  # the engine's own reading of the choice
        chosen = combine([(loaded[name], w) for name, w in weights.items()]) if weights else None
        with torch.no_grad(), apply_adapters(hf, chosen):
            generated = hf.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        out.append(tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True))
    del hf
    return out


def fidelity_fp32(model: str, adapters: dict) -> dict:
    """The mixed batch in a compiled fp32 engine against the transformers reference."""
    from vllm import SamplingParams

    from lofit.vllm.architectures import cpu_engine_defaults
    from lofit.vllm.offline import LofitLLM

    a, b = list(adapters)[:2]
    cases = _cases(a, b)
    expected = reference(model, adapters, cases)
    llm = LofitLLM(model, adapters=list(adapters.values()), dtype="float32", max_model_len=512, max_num_seqs=16,
                   **cpu_engine_defaults())
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS)
    outputs = llm.generate([PROMPTS[i % len(PROMPTS)] for i in range(len(cases))], params,
                           adapters=[choice for _, choice in cases])
    _stop(llm)
    rows = [{"case": label, "equal": o.outputs[0].text == want, "text": o.outputs[0].text, "reference": want}
            for (label, _), o, want in zip(cases, outputs, expected, strict=True)]
    return {"ok": all(r["equal"] for r in rows), "cases": rows}


def main(argv: list[str] | None = None) -> int:
    from lofit.default_model import default_model_dir

    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check_vllm", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the default model)")
    parser.add_argument("--adapters", nargs=2, default=["adapters/truthfulqa", "adapters/mquake"],
                        help="two adapter directories for the fidelity batch")
    parser.add_argument("--out", type=Path, default=Path("gpu-check/vllm.json"))
    args = parser.parse_args(argv)
    model = str(args.model or default_model_dir())
    from lofit.adapter import load_adapter

    adapters = {load_adapter(path).name: path for path in args.adapters}
    results = {"self_test_bf16": self_test_bf16(model), "fidelity_fp32": fidelity_fp32(model, adapters)}
    print(f"{'check':<18} {'result':<6} detail")
    st = results["self_test_bf16"]
    detail = st.get("error") or f"FULL CUDA-graph replays per worker: {st['full_graph_replays_per_worker']}"
    print(f"{'self-test bf16':<18} {'ok' if st['ok'] else 'FAIL':<6} {detail}")
    for row in results["fidelity_fp32"]["cases"]:
        print(f"{'fidelity fp32':<18} {'ok' if row['equal'] else 'FAIL':<6} {row['case']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
