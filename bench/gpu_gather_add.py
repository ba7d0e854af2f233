"""Cost of LoFiT's per-token gather-add against one attention block + ``o_proj`` (torch + CUDA, no vLLM).

The plugin keeps, per layer, a table ``tables[layer]`` of ``[capacity, heads*head_dim]`` (row 0 = zeros,
"no adapter") and a per-token row index ``token_rows``; before ``o_proj`` every layer runs
``attn_output + tables[layer].index_select(0, token_rows[:n])`` (``AdapterBank.apply`` in
``lofit/vllm/bank.py``, mirrored exactly by :func:`gather_add` here). This script times that op against
the attention block it sits in — fused QKV projection, scaled-dot-product attention over a KV context,
``o_proj`` — at Llama-2-7B shapes (hidden 4096, 32 heads x 128, 32 layers, bank capacity 257), for

* decode: 256 sequences, one new token each, KV context of 1024 tokens per sequence;
* prefill: 4096 tokens (4 sequences of 1024, causal).

Variants of the add (each checked against the plain-torch reference before timing):

* ``torch``: the plugin's op (index_select, then add), out of place;
* ``addmm fold``: ``o_proj(x + T[r]) = x Wᵀ + (T Wᵀ)[r]``: the table pre-multiplied by ``o_proj``'s weight,
  gathered and added by the GEMM's epilogue (``torch.addmm``), no pass over ``x``;
* ``triton skip`` (CUDA with triton): in place, one program per token, tokens on row 0 skip all memory traffic;
* ``triton fold`` (CUDA with triton): a Triton GEMM for ``o_proj`` that adds the token's table row to each
  tile of its input as it loads it (the add costs only the table reads); compared with the same Triton GEMM
  without the add, and with torch's matmul (cuBLAS).

The overhead ratio is the gather-add time over the block time (goal <= 1 %); the block with the add minus
the block without is printed too. Rotary embedding and the KV-cache write are left out of the block, which
makes the block cheaper and the ratio conservative. On a GPU the timed calls are captured in a CUDA graph
(as vLLM runs decode) and timed with CUDA events; ``--no-graphs`` times plain launches.

    python -m bench.gpu_gather_add                         # CUDA, Llama-2-7B shapes
    python -m bench.gpu_gather_add --device cpu            # small shapes, a smoke test of the script
    TRITON_INTERPRET=1 python -m bench.gpu_gather_add --device cpu --triton --check-only --dtype float32
                                                           # the Triton kernels' correctness, on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

GOAL = 0.01  # gather-add / (attention block + o_proj)


@dataclass(frozen=True)
class Shapes:
    hidden: int
    heads: int
    head_dim: int
    kv_heads: int
    layers: int
    capacity: int  # bank rows (max_num_seqs + 1)
    decode_batch: int
    context: int  # KV tokens per sequence at decode
    prefill_tokens: int
    prefill_seq: int  # tokens per sequence at prefill

    @property
    def width(self) -> int:
        return self.heads * self.head_dim


SHAPES = {
    "llama2-7b": Shapes(hidden=4096, heads=32, head_dim=128, kv_heads=32, layers=32, capacity=257,
                        decode_batch=256, context=1024, prefill_tokens=4096, prefill_seq=1024),
    "llama3-8b": Shapes(hidden=4096, heads=32, head_dim=128, kv_heads=8, layers=32, capacity=257,
                        decode_batch=256, context=1024, prefill_tokens=4096, prefill_seq=4096),
    "small": Shapes(hidden=512, heads=8, head_dim=64, kv_heads=8, layers=4, capacity=17,
                    decode_batch=16, context=128, prefill_tokens=256, prefill_seq=128),
}


# -- the op, as the plugin runs it ------------------------------------------------------------------------

def gather_add(tables: torch.Tensor, layer: int, token_rows: torch.Tensor, attn_output: torch.Tensor) -> torch.Tensor:
    """``AdapterBank.apply``: each token's row of ``tables[layer]`` added to ``attn_output [n, heads*head_dim]``."""
    rows = token_rows[: attn_output.shape[0]]
    return attn_output + tables[layer].index_select(0, rows).to(attn_output.dtype)


def addmm_fold(folded: torch.Tensor, layer: int, token_rows: torch.Tensor, attn_output: torch.Tensor,
               wo: torch.Tensor) -> torch.Tensor:
    """``o_proj(attn_output + T[r])`` as ``addmm((T Wᵀ)[r], attn_output, Wᵀ)``; ``folded[layer] = T[layer] Wᵀ``."""
    rows = token_rows[: attn_output.shape[0]]
    return torch.addmm(folded[layer].index_select(0, rows), attn_output, wo.t())


# -- one attention block ----------------------------------------------------------------------------------

class AttentionBlock:
    """Fused QKV projection, SDPA, ``o_proj`` (Llama attention without rotary and without the cache write)."""

    def __init__(self, s: Shapes, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> None:
        self.s = s
        qkv_out = (s.heads + 2 * s.kv_heads) * s.head_dim
        self.wqkv = (torch.randn(qkv_out, s.hidden, generator=gen) / s.hidden**0.5).to(device, dtype)
        self.wo = (torch.randn(s.hidden, s.width, generator=gen) / s.width**0.5).to(device, dtype)

    def attention(self, x: torch.Tensor, seqs: int, kv: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """``o_proj``'s input ``[n, heads*head_dim]`` for ``x [n, hidden]``: ``seqs`` sequences of ``n/seqs``
        tokens, causal over themselves (prefill), or one token each over a KV cache ``kv`` (decode)."""
        s = self.s
        n = x.shape[0]
        q, k, v = (x @ self.wqkv.t()).split([s.width, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], dim=-1)
        q = q.view(seqs, n // seqs, s.heads, s.head_dim).transpose(1, 2)
        if kv is None:
            k = k.view(seqs, n // seqs, s.kv_heads, s.head_dim).transpose(1, 2)
            v = v.view(seqs, n // seqs, s.kv_heads, s.head_dim).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=s.kv_heads != s.heads)
        else:
            out = F.scaled_dot_product_attention(q, kv[0], kv[1], enable_gqa=s.kv_heads != s.heads)
        return out.transpose(1, 2).reshape(n, s.width)

    def o_proj(self, a: torch.Tensor) -> torch.Tensor:
        return a @ self.wo.t()


# -- Triton variants (CUDA, or the interpreter with TRITON_INTERPRET=1) -------------------------------------

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

if triton is not None:
    @triton.jit
    def _gather_add_skip_kernel(out_ptr, rows_ptr, table_ptr, width, stride_out, stride_table,
                                BLOCK: tl.constexpr):
        """``out[t] += table[rows[t]]`` in place for one token ``t``; a token on row 0 touches no memory."""
        token = tl.program_id(0)
        row = tl.load(rows_ptr + token)
        if row != 0:
            for start in range(0, width, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < width
                x = tl.load(out_ptr + token * stride_out + cols, mask=mask)
                t = tl.load(table_ptr + row * stride_table + cols, mask=mask)
                tl.store(out_ptr + token * stride_out + cols, x + t, mask=mask)

    @triton.jit
    def _o_proj_kernel(x_ptr, rows_ptr, table_ptr, w_ptr, out_ptr, M, N, K,
                       stride_x, stride_table, stride_w, stride_out,
                       STEER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """``out = (x + table[rows]) @ wᵀ`` (``STEER``) or ``x @ wᵀ``: the add happens on each loaded tile of
        ``x``, and tokens on row 0 do not read the table."""
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask, n_mask = offs_m < M, offs_n < N
        if STEER:
            rows = tl.load(rows_ptr + offs_m, mask=m_mask, other=0)
            steered = m_mask & (rows != 0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            a = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :],
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if STEER:
                t = tl.load(table_ptr + rows[:, None] * stride_table + offs_k[None, :],
                            mask=steered[:, None] & k_mask[None, :], other=0.0)
                a = a + t
            b = tl.load(w_ptr + offs_n[None, :] * stride_w + offs_k[:, None],
                        mask=n_mask[None, :] & k_mask[:, None], other=0.0)
            acc += tl.dot(a, b)
        tl.store(out_ptr + offs_m[:, None] * stride_out + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_gather_add_skip(table: torch.Tensor, token_rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """In-place gather-add of ``table [capacity, width]`` rows into ``out [n, width]``; returns ``out``."""
    n, width = out.shape
    _gather_add_skip_kernel[(n,)](out, token_rows, table, width, out.stride(0), table.stride(0),
                                  BLOCK=min(1024, triton.next_power_of_2(width)))
    return out


def triton_o_proj(x: torch.Tensor, wo: torch.Tensor, table: torch.Tensor | None = None,
                  token_rows: torch.Tensor | None = None, blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``(x + table[token_rows]) @ woᵀ`` in one Triton GEMM (``table`` None: plain ``x @ woᵀ``)."""
    m, k = x.shape
    n = wo.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bm, bn, bk = blocks or ((16, 32, 32) if _interpreted() else (64, 128, 64))
    steer = table is not None
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    kwargs = {} if _interpreted() else {"num_warps": 4, "num_stages": 3}
    _o_proj_kernel[grid](x, token_rows if steer else x, table if steer else x, wo, out, m, n, k,
                         x.stride(0), table.stride(0) if steer else 0, wo.stride(0), out.stride(0),
                         STEER=steer, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **kwargs)
    return out


# -- timing -----------------------------------------------------------------------------------------------

def time_ms(fn: Callable[[], object], device: torch.device, iters: int, repeats: int, graphs: bool) -> float:
    """Median milliseconds per call of ``fn`` over ``repeats`` runs of ``iters`` back-to-back calls.

    On CUDA the ``iters`` calls are captured in one CUDA graph when ``graphs`` (launch overhead off, as in
    vLLM's decode) and timed with CUDA events; on CPU with ``time.perf_counter``.
    """
    for _ in range(3):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            times.append((time.perf_counter() - start) * 1000 / iters)
        return statistics.median(times)
    run: Callable[[], object] = lambda: [fn() for _ in range(iters)]  # noqa: E731
    if graphs:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        run = graph.replay
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


# -- one scenario -----------------------------------------------------------------------------------------

def scenario_inputs(s: Shapes, kind: str, steered: float, dtype: torch.dtype, device: torch.device,
                    gen: torch.Generator) -> dict:
    """Hidden states, KV cache and per-token rows for decode or prefill; a ``steered`` fraction of the
    sequences holds a distinct non-zero row (the rest row 0)."""
    if kind == "decode":
        seqs, per_seq = s.decode_batch, 1
        kv = tuple((torch.randn(seqs, s.kv_heads, s.context, s.head_dim, generator=gen)).to(device, dtype)
                   for _ in range(2))
    else:
        seqs, per_seq, kv = s.prefill_tokens // s.prefill_seq, s.prefill_seq, None
    n = seqs * per_seq
    steered_seqs = round(steered * seqs)
    seq_rows = [1 + i % (s.capacity - 1) if i < steered_seqs else 0 for i in range(seqs)]
    rows = torch.tensor(seq_rows, dtype=torch.int64).repeat_interleave(per_seq).to(device)
    x = torch.randn(n, s.hidden, generator=gen).to(device, dtype)
    return {"x": x, "seqs": seqs, "kv": kv, "rows": rows, "tokens": n}


def run_scenario(s: Shapes, kind: str, steered: float, args: argparse.Namespace, device: torch.device,
                 dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(0)
    block = AttentionBlock(s, dtype, device, gen)
    tables = torch.zeros(s.layers, s.capacity, s.width)
    tables[:, 1:] = 0.1 * torch.randn(s.layers, s.capacity - 1, s.width, generator=gen)
    tables = tables.to(device, dtype)
    layer = s.layers // 2
    folded = (tables.float() @ block.wo.float().t()).to(dtype)  # [layers, capacity, hidden]
    inp = scenario_inputs(s, kind, steered, dtype, device, gen)
    x, seqs, kv, rows = inp["x"], inp["seqs"], inp["kv"], inp["rows"]
    a = block.attention(x, seqs, kv)  # a fixed o_proj input for the isolated timings
    use_triton = triton is not None and (device.type == "cuda" or (args.triton and _interpreted()))

    # correctness of every variant against the plugin's op, before any timing
    reference = block.o_proj(gather_add(tables, layer, rows, a)).float()
    candidates = {"addmm fold": addmm_fold(folded, layer, rows, a, block.wo)}
    if use_triton:
        candidates["triton skip"] = block.o_proj(triton_gather_add_skip(tables[layer], rows, a.clone()))
        candidates["triton fold"] = triton_o_proj(a, block.wo, tables[layer], rows)
        candidates["triton o_proj (no add)"] = triton_o_proj(gather_add(tables, layer, rows, a), block.wo)
    scale = reference.abs().max().item()
    errors = {name: (out.float() - reference).abs().max().item() / scale for name, out in candidates.items()}
    tolerance = 5e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
    bad = {name: err for name, err in errors.items() if err > tolerance}
    if bad:
        raise AssertionError(f"{kind}: variants disagree with the plugin's gather-add: {bad}")
    if args.check_only:
        return {"kind": kind, "steered": steered, "tokens": inp["tokens"], "max_rel_error": errors}

    def t(fn: Callable[[], object]) -> float:
        return time_ms(fn, device, args.iters, args.repeats, args.graphs and device.type == "cuda")

    buf = a.clone()
    ms = {
        "attention block + o_proj": t(lambda: block.o_proj(block.attention(x, seqs, kv))),
        "o_proj (torch matmul)": t(lambda: block.o_proj(a)),
        "gather-add (torch, the plugin's op)": t(lambda: gather_add(tables, layer, rows, a)),
        "block + gather-add (torch)": t(lambda: block.o_proj(gather_add(tables, layer, rows,
                                                                        block.attention(x, seqs, kv)))),
        "o_proj with addmm fold": t(lambda: addmm_fold(folded, layer, rows, a, block.wo)),
        "block with addmm fold": t(lambda: addmm_fold(folded, layer, rows, block.attention(x, seqs, kv), block.wo)),
    }
    if use_triton and not _interpreted():
        ms["gather-add (triton skip, in place)"] = t(lambda: triton_gather_add_skip(tables[layer], rows, buf))
        ms["block + gather-add (triton skip)"] = t(lambda: block.o_proj(
            triton_gather_add_skip(tables[layer], rows, block.attention(x, seqs, kv))))
        ms["o_proj (triton, no add)"] = t(lambda: triton_o_proj(a, block.wo))
        ms["o_proj (triton fold)"] = t(lambda: triton_o_proj(a, block.wo, tables[layer], rows))
    base = ms["attention block + o_proj"]
    ratios = {
        "torch gather-add / block": ms["gather-add (torch, the plugin's op)"] / base,
        "(block + torch gather-add - block) / block": ms["block + gather-add (torch)"] / base - 1,
        "(addmm fold - o_proj) / block": (ms["o_proj with addmm fold"] - ms["o_proj (torch matmul)"]) / base,
        "(block with addmm fold - block) / block": ms["block with addmm fold"] / base - 1,
    }
    if "o_proj (triton fold)" in ms:
        ratios["triton skip / block"] = ms["gather-add (triton skip, in place)"] / base
        ratios["(block + triton skip - block) / block"] = ms["block + gather-add (triton skip)"] / base - 1
        ratios["(triton fold - triton o_proj) / block"] = (ms["o_proj (triton fold)"]
                                                           - ms["o_proj (triton, no add)"]) / base
        ratios["(triton fold - torch o_proj) / block"] = (ms["o_proj (triton fold)"]
                                                          - ms["o_proj (torch matmul)"]) / base
    return {"kind": kind, "steered": steered, "tokens": inp["tokens"], "ms": ms, "ratios": ratios,
            "max_rel_error": errors,
            "goal_met": ratios["torch gather-add / block"] <= GOAL}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_gather_add", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", choices=sorted(SHAPES), help="default: llama2-7b on CUDA, small on CPU")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--steered", default="1.0,0.0",
                        help="fractions of sequences with an adapter, comma-separated (1.0 = worst case)")
    parser.add_argument("--iters", type=int, default=20, help="calls per timed run")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs (median reported)")
    parser.add_argument("--no-graphs", dest="graphs", action="store_false", help="CUDA: no CUDA-graph capture")
    parser.add_argument("--triton", action="store_true",
                        help="check the Triton kernels on CPU too (needs TRITON_INTERPRET=1; correctness only)")
    parser.add_argument("--check-only", action="store_true", help="only check the variants agree, no timing")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    device = torch.device(args.device)
    if _interpreted() and args.dtype == "bfloat16":
        parser.error("the Triton interpreter has no bfloat16 (numpy has none): add --dtype float16 or float32")
    shapes = SHAPES[args.shapes or ("llama2-7b" if device.type == "cuda" else "small")]
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, {args.dtype}, shapes {asdict(shapes)}, triton "
          f"{'interpreted' if _interpreted() else (triton.__version__ if triton else 'not installed')}, "
          f"CUDA graphs {'on' if args.graphs and device.type == 'cuda' else 'off'}", flush=True)
    results = []
    for kind in ("decode", "prefill"):
        for steered in (float(f) for f in args.steered.split(",")):
            result = run_scenario(shapes, kind, steered, args, device, dtype)
            results.append(result)
            print(f"\n## {kind}: {result['tokens']} tokens, {steered:.0%} of sequences steered")
            print("max relative error vs the plugin's op: "
                  + ", ".join(f"{k} {v:.1e}" for k, v in result["max_rel_error"].items()))
            if args.check_only:
                continue
            print("\n| op | ms |\n|---|---|")
            for op, value in result["ms"].items():
                print(f"| {op} | {value:.4f} |")
            print("\n| overhead | ratio |\n|---|---|")
            for label, value in result["ratios"].items():
                print(f"| {label} | {value:+.2%} |")
            verdict = "PASS" if result["goal_met"] else "MISS"
            print(f"\ngather-add / block = {result['ratios']['torch gather-add / block']:.2%} "
                  f"(goal <= {GOAL:.0%}): {verdict}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": name, "dtype": args.dtype, "shapes": asdict(shapes),
                                        "graphs": args.graphs and device.type == "cuda", "iters": args.iters,
                                        "repeats": args.repeats, "goal": GOAL, "results": results}, indent=2))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
