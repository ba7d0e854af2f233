"""The GPU check of the plugin's steering path, for a CUDA machine with torch and without vLLM.

Runs the real :class:`lofit.vllm.bank.AdapterBank` (which imports no vLLM) at Llama-3-8B shapes (hidden 4096,
32 query heads x 128, bf16) in front of a toy ``o_proj``:

1. **CUDA-graph replay (V2 fill).** ``fill_token_rows_v2`` + ``bank.apply`` + ``o_proj`` for a decode batch is
   captured once in a CUDA graph, then replayed after the batch's slots are given other adapters (other bank
   rows), after a row's content is rewritten in place (a reload) and with new activations; every replay must
   equal the same ops run eagerly. This is how vLLM's V2 runner replays FULL graphs across steps.
2. **V1 fill without a host sync.** ``bank.fill_token_rows`` (host rows through pinned staging) is called while
   the device is busy with a long matmul; it must return before that matmul ends (no synchronisation), and the
   graph replayed after it must equal eager.
3. **Cost.** ``python -m bench.gpu_gather_add --shapes llama3-8b`` times the gather-add against the attention
   block + ``o_proj`` for decode batch 256 and a 4,096-token prefill (goal: <= 1 % of the block).

``--device cpu`` runs checks 1-2 eagerly at small shapes (a smoke test of the script; no graph, no timing).
Prints a table and writes JSON (``--out``); exits 1 when a check fails.

    bash scripts/gpu-check.sh                     # on a CUDA machine: all three, a few minutes
    python -m bench.gpu_check --device cpu        # the script's own smoke test
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from lofit.adapter import LofitAdapter
from lofit.heads import BaseModelIdentity
from lofit.vllm.bank import AdapterBank, fill_token_rows_v2

LLAMA3_8B = dict(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                 hidden_size=4096, vocab_size=128256)
SMALL = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, hidden_size=128,
             vocab_size=1000)


def identity(shapes: dict[str, int]) -> BaseModelIdentity:
    """A base-model identity of the given shapes (the bank needs only its layout)."""
    return BaseModelIdentity(name_or_path="gpu-check", architecture="LlamaForCausalLM",
                             fingerprint="sha256:gpu-check", **shapes)


class Step:
    """One decode step at one layer: the V2 fill, the bank's gather-add, ``o_proj`` (static buffers)."""

    def __init__(self, bank: AdapterBank, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        width = bank.tables.shape[-1]
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.bank = bank
        self.o_proj = torch.nn.Linear(width, width, bias=False).to(device, dtype)
        self.x = torch.randn(batch, width, generator=gen).to(device, dtype)
        self.slot_rows = torch.zeros(batch, dtype=torch.int64, device=device)
        self.idx_mapping = torch.arange(batch, device=device)
        self.query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device=device)
        self.out = torch.empty(batch, width, device=device, dtype=dtype)
        self.batch = batch

    def run(self, fill: bool = True) -> None:
        if fill:
            fill_token_rows_v2(self.bank.token_rows, self.slot_rows, self.idx_mapping, self.query_start_loc,
                               self.batch, self.batch, self.batch)
        self.out.copy_(self.o_proj(self.bank.apply(0, self.x)))


def eager(step: Step, fill: bool = True) -> torch.Tensor:
    step.run(fill)
    return step.out.clone()


def capture(step: Step, fill: bool) -> torch.cuda.CUDAGraph:
    """``step.run`` captured in a CUDA graph (warmed up on a side stream, as vLLM does)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step.run(fill)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step.run(fill)
    return graph


def check_replays(bank: AdapterBank, rows: dict[str, int], step: Step, cuda: bool, names: list[str]) -> list[dict]:
    """Check 1: graph replays equal eager after rows, contents and activations change."""
    results = []
    graph = capture(step, fill=True) if cuda else None

    def compare(label: str) -> None:
        if graph is not None:
            graph.replay()
            torch.cuda.synchronize()
            replayed = step.out.clone()
        else:
            step.run()
            replayed = step.out.clone()
        expected = eager(step)
        diff = (replayed.float() - expected.float()).abs().max().item()
        kind = "replay" if graph is not None else "eager (smoke)"
        results.append({"check": f"V2 {kind}: {label}", "max_abs_diff": diff, "ok": diff == 0.0})

    order = [rows[n] for n in names]
    step.slot_rows.copy_(torch.tensor([order[i % len(order)] for i in range(step.batch)]))
    compare("mixed rows (none / A / B / A+0.5B)")
    step.slot_rows.copy_(step.slot_rows.flip(0))
    compare("rows moved to other slots")
    reloaded = LofitAdapter.random(bank.base, "a", "all", seed=99, scale=2.0)
    bank.load(reloaded)  # new content under name "a": a new row is written for it in place
    row, _ = bank.acquire(bank.combination({"a": 1.0}))
    step.slot_rows[0] = row
    compare("a reloaded adapter's new row")
    step.x.normal_()
    compare("new activations")
    steered = (step.out.float() - torch.nn.functional.linear(step.x, step.o_proj.weight).float()).abs().amax(-1)
    results.append({"check": "steered slots differ from unsteered ones", "ok": bool(
        (steered[step.slot_rows != 0] > 0).all() and (steered[step.slot_rows == 0] == 0).all()),
        "max_abs_diff": None})
    return results


def check_v1_fill(bank: AdapterBank, rows: dict[str, int], step: Step, cuda: bool) -> list[dict]:
    """Check 2: the host-side fill does not wait for the device, and the replay after it equals eager."""
    results = []
    graph = capture(step, fill=False) if cuda else None
    cycle = list(rows.values())
    request_rows = [cycle[i % len(cycle)] for i in range(step.batch)]
    counts = [1] * len(request_rows)
    pending = None
    if cuda:
        busy = torch.randn(8192, 8192, device=step.x.device, dtype=step.x.dtype)
        torch.cuda.synchronize()
        for _ in range(20):
            busy = busy @ busy.t() / 8192  # long device work, queued
        pending = torch.cuda.Event()
        pending.record()
    started = time.perf_counter()
    bank.fill_token_rows(request_rows, counts, num_padded=step.batch)
    fill_ms = (time.perf_counter() - started) * 1000
    if pending is not None:
        results.append({"check": "V1 fill returns while the device is busy (no host sync)",
                        "ok": not pending.query(), "fill_ms": round(fill_ms, 3)})
        graph.replay()
        torch.cuda.synchronize()
        replayed = step.out.clone()
    else:
        step.run(fill=False)
        replayed = step.out.clone()
    expected = eager(step, fill=False)
    diff = (replayed.float() - expected.float()).abs().max().item()
    results.append({"check": f"V1 fill then {'replay' if cuda else 'eager (smoke)'}", "max_abs_diff": diff,
                    "ok": diff == 0.0})
    want = torch.repeat_interleave(torch.tensor(request_rows), torch.tensor(counts))
    results.append({"check": "V1 fill wrote every token's row",
                    "ok": torch.equal(bank.token_rows[:len(want)].cpu(), want)})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256, help="decode batch (sequences, one token each)")
    parser.add_argument("--no-timing", dest="timing", action="store_false", help="skip the cost benchmark")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    shapes = LLAMA3_8B if cuda else SMALL
    dtype = torch.bfloat16 if cuda else torch.float32
    batch = args.batch if cuda else 8
    base = identity(shapes)
    bank = AdapterBank(base, capacity=257 if cuda else 9, max_num_tokens=max(batch, 8192 if cuda else 64),
                       dtype=dtype, device=device)
    names = ["a", "b"]
    for seed, name in enumerate(names):
        bank.load(LofitAdapter.random(base, name, 64 if cuda else 3, seed=seed, scale=2.0))
    rows = {"none": 0}
    for label, weights in (("A", {"a": 1.0}), ("B", {"b": 1.0}), ("A+0.5B", {"a": 1.0, "b": 0.5})):
        rows[label] = bank.acquire(bank.combination(weights))[0]
    step = Step(bank, batch, device, dtype)
    results = check_replays(bank, rows, step, cuda, ["none", "A", "B", "A+0.5B"])
    results += check_v1_fill(bank, rows, step, cuda)
    report = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
              "shapes": shapes, "dtype": str(dtype), "batch": batch, "checks": results}
    print("| check | ok | detail |\n|---|---|---|")
    for r in results:
        detail = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("check", "ok"))
        print(f"| {r['check']} | {'PASS' if r['ok'] else 'FAIL'} | {detail} |")
    if cuda and args.timing:
        timing = subprocess.run([sys.executable, "-m", "bench.gpu_gather_add", "--shapes", "llama3-8b"],
                                capture_output=True, text=True)
        print(timing.stdout + timing.stderr)
        report["gather_add_rc"] = timing.returncode
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return 0 if all(r["ok"] for r in results) and report.get("gather_add_rc", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
