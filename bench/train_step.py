"""Trainer cost: one LoFiT stage-2 step against one plain forward+backward of the frozen model.

Both run on the same batch (the first ``--pairs`` TruthfulQA DPO pairs, chosen and rejected in one
padded batch). The plain step is forward, the same summed answer log-prob loss, and a backward through the
whole frozen network (to its input embeddings), which any gradient method reaching layer 0 must pay.
The LoFiT step is the trainer's real step: attach the LoFiT module, forward, DPO loss, backward, clip, AdamW and
schedule. Its heads are spread over the layers, one in layer 0, so the backward is as deep as the plain
one (the worst case; heads only in later layers make stage 2 cheaper). Stage 1 (scales on every head) is
timed too. Variants are interleaved, the median of ``--repeats`` is reported.

    python -m bench.train_step [--model DIR] [--pairs 8] [--repeats 10] [--out bench/results/train_step.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from lofit.default_model import default_model_dir
from lofit.heads import layout_from_config
from lofit.hf import load_model, pad_token_id
from lofit.tasks import load_task
from lofit.train.data import collate, encode_examples
from lofit.train.losses import sequence_logprobs
from lofit.train.objective import Objective
from lofit.train.parameters import LofitParameters


def spread_heads(num_layers: int, num_heads: int, k: int) -> list[tuple[int, int]]:
    """K heads spread evenly over the layers, starting at layer 0."""
    return [(round(i * (num_layers - 1) / max(1, k - 1)), i % num_heads) for i in range(k)]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(default_model_dir()))
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--heads-percent", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default="bench/results/train_step.json")
    args = parser.parse_args()

    tokenizer, model = load_model(args.model, args.dtype, "cpu")
    pairs = load_task("truthfulqa").train[: args.pairs]
    encoded = encode_examples(tokenizer, pairs, 128, 512)
    objective = Objective(model, "dpo", pad_token_id(tokenizer), 0.5, "cpu")
    layout = layout_from_config(model.config)
    k = max(1, round(layout.total_heads * args.heads_percent / 100))
    heads = torch.tensor(sorted(spread_heads(layout.num_layers, layout.num_heads, k)))
    stage2_params = LofitParameters(layout, heads=heads, offsets=torch.randn(k, layout.head_dim) * 1e-3)
    stage1_params = LofitParameters(layout, scales=torch.randn(layout.num_layers, layout.num_heads,
                                                               layout.head_dim) * 1e-3)
    opt_v = torch.optim.AdamW(stage2_params.trainable(), lr=1e-2, weight_decay=0.0)
    opt_a = torch.optim.AdamW(stage1_params.trainable(), lr=5e-3, weight_decay=0.0)
    batch = collate(encoded, list(range(len(encoded))), objective.pad_id)
    objective.precompute_reference(encoded, len(encoded))
    model.train()

    def plain_step() -> None:
        embeds = model.get_input_embeddings()(batch.input_ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, attention_mask=batch.attention_mask).logits
        sequence_logprobs(logits, batch.input_ids, batch.score_mask).sum().backward()

    def lofit_step(lofit: LofitParameters, optimizer, penalty=None) -> None:
        with lofit.attach(model):
            loss = objective.loss(batch, encoded)
            if penalty is not None:
                loss = loss + penalty()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(lofit.trainable(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def stage2() -> None:
        lofit_step(stage2_params, opt_v)

    def stage1() -> None:
        lofit_step(stage1_params, opt_a, lambda: 5e-4 * stage1_params.scales.abs().sum())

    variants = {"plain forward+backward": plain_step, "LoFiT stage-2 step": stage2, "LoFiT stage-1 step": stage1}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    plain = statistics.median(times["plain forward+backward"])
    rows = [{"variant": name, "median_s": statistics.median(t), "min_s": min(t),
             "ratio_to_plain": statistics.median(t) / plain} for name, t in times.items()]
    tokens = int(batch.attention_mask.sum())
    print(f"model {args.model} ({args.dtype}), batch {len(encoded)} pairs = {batch.input_ids.shape[0]} sequences, "
          f"{tokens} tokens; K = {k} heads spread over layers {sorted({h[0] for h in heads.tolist()})}; "
          f"torch threads {torch.get_num_threads()}\n")
    print(f"| {'variant':<24} | median s | min s  | ratio to plain |")
    print(f"|{'-' * 26}|----------|--------|----------------|")
    for row in rows:
        cells = f"{row['median_s']:8.3f} | {row['min_s']:6.3f} | {row['ratio_to_plain']:14.3f}"
        print(f"| {row['variant']:<24} | {cells} |")
    ratio = statistics.median(times["LoFiT stage-2 step"]) / plain
    verdict = "PASS" if ratio <= 1.15 else "FAIL"
    print(f"\nstage-2 step / plain forward+backward = {ratio:.3f} (target <= 1.15): {verdict}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "stage2_ratio": ratio, "target": 1.15, "k": k,
                               "heads": heads.tolist(), "tokens": tokens, "sequences": int(batch.input_ids.shape[0]),
                               "repeats": args.repeats, "model": args.model, "dtype": args.dtype,
                               "machine": platform.platform(), "torch": torch.__version__,
                               "threads": torch.get_num_threads()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
