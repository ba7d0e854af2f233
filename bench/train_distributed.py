"""Stage-2 training throughput with 1 and with 2 data-parallel ranks, and each one's cost against a plain
forward+backward.

For each rank count, ``torchrun --nproc_per_node R`` starts this script's worker (``--worker``), each rank
pinned to one thread (``OMP_NUM_THREADS=1``). The worker runs the trainer's real stage 2
(:func:`lofit.train.stage2.tune_offsets`: attach, forward, DPO loss, backward, gradient all-reduce, clipping,
AdamW) on TruthfulQA DPO pairs with ``--pairs-per-rank`` pairs per rank per step (weak scaling: 2 ranks do twice
the work per step), and reads each step's wall time from the stage's history. Then it times a plain
forward+backward of the frozen model on the same micro-batches (the loss is the summed answer log-probs; the
backward runs to the input embeddings, as any gradient method reaching layer 0 must), ending at a barrier: like
the LoFiT step's all-reduce, a data-parallel step waits for its slowest rank. The K = 3 % heads are
spread over the layers from layer 0 (the deepest backward; see ``bench/train_step.py``).

Reported: stage-2 tokens/s (non-pad tokens of all ranks over the measured steps / their wall time), the speed-up
of 2 ranks over 1 (and the same for the plain forward+backward, which shows what the machine allows), and per
rank count the median over steps of LoFiT step / plain forward+backward on the same micro-batches (target
<= 1.15).

    python -m bench.train_distributed [--model DIR] [--ranks 1 2] [--steps 10] [--device cpu|cuda]
                                      [--out bench/results/train_distributed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lofit.default_model import default_model_dir

TARGET = 1.15


def worker(args: argparse.Namespace) -> None:
    """One rank: real stage 2 for ``--steps`` (+1 warm-up) steps, then plain forward+backward on the same data."""
    from bench.train_step import spread_heads
    from lofit.heads import layout_from_config
    from lofit.hf import load_model, pad_token_id
    from lofit.tasks import load_task
    from lofit.train.data import encode_examples
    from lofit.train.distributed import Distributed, resolve_mode
    from lofit.train.losses import sequence_logprobs
    from lofit.train.objective import Objective
    from lofit.train.stage2 import tune_offsets

    dist = Distributed.start(resolve_mode(None), args.device)
    try:
        tokenizer, model = load_model(args.model, args.dtype, dist.device)
        layout = layout_from_config(model.config)
        k = max(1, round(layout.total_heads * 0.03))
        heads = spread_heads(layout.num_layers, layout.num_heads, k)
        global_pairs = args.pairs_per_rank * dist.world_size
        pairs = load_task("truthfulqa").train[: global_pairs * (args.steps + 1)]
        encoded = encode_examples(tokenizer, pairs, 128, 512)
        objective = Objective(model, "dpo", pad_token_id(tokenizer), 0.5, dist.device, dist, args.mixed_precision)
        tuned = tune_offsets(objective, layout, heads, encoded, [], lr=1e-2, epochs=1, init_std=1e-3, seed=0,
                             batch_size=args.pairs_per_rank, grad_accum=1, max_grad_norm=1.0, progress=False)
        lofit_steps = [s["seconds"] for s in tuned.history.steps[1:]]  # step 1 warms up

        # the same steps' micro-batches, in the loop's order, through a plain forward+backward
        order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(0)).tolist()
        chunks = objective.chunks(order, args.pairs_per_rank)
        plain_steps, tokens = [], []
        model.train()
        for first in range(0, len(chunks), dist.world_size):
            group = chunks[first:first + dist.world_size]
            tokens.append(sum(int(objective.batch(encoded, c).attention_mask.sum()) for c in group))
            started = time.perf_counter()
            for indices, _weight in objective.share(group):
                batch = objective.batch(encoded, indices)
                embeds = model.get_input_embeddings()(batch.input_ids).detach().requires_grad_(True)
                with objective.autocast():
                    logits = model(inputs_embeds=embeds, attention_mask=batch.attention_mask).logits
                sequence_logprobs(logits, batch.input_ids, batch.score_mask).sum().backward()
            if dist.device.type == "cuda":
                torch.cuda.synchronize()
            dist.barrier()  # a data-parallel step ends when its slowest rank does, as the LoFiT step's all-reduce
            plain_steps.append(time.perf_counter() - started)
        plain_steps, tokens = plain_steps[1:], tokens[1:]
        pairs_of_steps = [a / b for a, b in zip(lofit_steps, plain_steps, strict=True)]
        result = {"ranks": dist.world_size, "pairs_per_rank": args.pairs_per_rank, "k": k,
                  "lofit_step_s": statistics.median(lofit_steps), "plain_step_s": statistics.median(plain_steps),
                  "lofit_steps_s": lofit_steps, "plain_steps_s": plain_steps, "tokens_per_step": tokens,
                  "tokens_per_s": sum(tokens) / sum(lofit_steps), "plain_tokens_per_s": sum(tokens) / sum(plain_steps),
                  "ratio": statistics.median(pairs_of_steps), "threads_per_rank": torch.get_num_threads(),
                  "device": str(dist.device)}
        if dist.is_main:
            Path(args.worker_out).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        dist.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.train_distributed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(default_model_dir()))
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=10, help="measured steps (after one warm-up step)")
    parser.add_argument("--pairs-per-rank", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--mixed-precision", default="no", choices=("no", "bf16"))
    parser.add_argument("--out", default="bench/results/train_distributed.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torchrun = Path(sys.executable).with_name("torchrun")
    rows = []
    for ranks in args.ranks:
        worker_out = out.with_name(f"{out.stem}.ranks{ranks}.json")
        command = [str(torchrun), "--standalone", "--nproc_per_node", str(ranks), "-m", "bench.train_distributed",
                   "--worker", "--worker-out", str(worker_out), "--model", args.model, "--steps", str(args.steps),
                   "--pairs-per-rank", str(args.pairs_per_rank), "--device", args.device, "--dtype", args.dtype,
                   "--mixed-precision", args.mixed_precision]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        print(f"running {ranks} rank(s): {' '.join(command)}", flush=True)
        subprocess.run(command, check=True, env=env)
        rows.append(json.loads(worker_out.read_text()))
        worker_out.unlink()

    base = rows[0]["tokens_per_s"]
    print(f"\nmodel {args.model} ({args.dtype}, mixed precision {args.mixed_precision}) on {args.device}; stage 2, "
          f"K = {rows[0]['k']} heads, {args.pairs_per_rank} DPO pairs per rank per step, median of {args.steps} "
          f"steps, 1 thread per rank\n")
    plain_base = rows[0]["plain_tokens_per_s"]
    print("| ranks | tokens/step | LoFiT step s | plain fwd+bwd s | LoFiT / plain | tokens/s | speed-up | "
          "plain speed-up |")
    print("|------:|------------:|-------------:|----------------:|--------------:|---------:|---------:|"
          "---------------:|")
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / base
        row["plain_speedup"] = row["plain_tokens_per_s"] / plain_base
        print(f"| {row['ranks']:5d} | {statistics.median(row['tokens_per_step']):11.0f} | "
              f"{row['lofit_step_s']:12.3f} | {row['plain_step_s']:15.3f} | {row['ratio']:13.3f} | "
              f"{row['tokens_per_s']:8.1f} | {row['speedup']:8.2f} | {row['plain_speedup']:14.2f} |")
    verdict = all(row["ratio"] <= TARGET for row in rows)
    print(f"\nLoFiT step / plain forward+backward <= {TARGET} for every rank count: {'PASS' if verdict else 'FAIL'}")
    from bench.common import machine_info

    out.write_text(json.dumps({"rows": rows, "target_ratio": TARGET, "pass": verdict, "model": args.model,
                               "dtype": args.dtype, "mixed_precision": args.mixed_precision,
                               "machine": machine_info(), "torch": torch.__version__}, indent=2) + "\n")


if __name__ == "__main__":
    main()
