"""Hot adapter load latency through HTTP: ``POST /adapters`` for ``--loads`` fresh adapters, then unload them.

Run against a live server whose adapters directory you can write to:

    lofit-serve --admin-key KEY &
    python bench/hot_load.py --url http://127.0.0.1:8000 --admin-key KEY --adapters-dir adapters [--loads 20]

Each adapter (8 heads, the shipped adapter's size) is written to the adapters directory first; only the HTTP
load is timed (validation against the served model, the load on every worker, and the registry update).
The adapters are unloaded and their folders removed afterwards. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import httpx
import torch

from lofit.adapter import LofitAdapter
from lofit.heads import identity_from_checkpoint
from lofit.models import default_model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--admin-key", required=True)
    parser.add_argument("--adapters-dir", type=Path, default=Path("adapters"))
    parser.add_argument("--model", type=Path, default=default_model_dir())
    parser.add_argument("--loads", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench/results/hot_load.json"))
    args = parser.parse_args()

    identity = identity_from_checkpoint(args.model, name=args.model.name)
    layout = identity.layout
    names = [f"bench-hot-{i:03d}" for i in range(args.loads)]
    client = httpx.Client(base_url=args.url, headers={"Authorization": f"Bearer {args.admin_key}"}, timeout=60)
    wall, server = [], []
    try:
        for i, name in enumerate(names):
            gen = torch.Generator().manual_seed(i)
            flat = torch.randperm(layout.num_layers * layout.num_heads, generator=gen)[:8]
            heads = torch.stack([flat // layout.num_heads, flat % layout.num_heads], dim=1)
            LofitAdapter(heads=heads, offsets=0.1 * torch.randn(8, layout.head_dim, generator=gen),
                         base_model=identity, name=name).save(args.adapters_dir / name)
            start = time.perf_counter()
            response = client.post("/adapters", json={"name": name})
            wall.append((time.perf_counter() - start) * 1000)
            response.raise_for_status()
            server.append(response.json()["load_ms"])
    finally:
        for name in names:
            client.delete(f"/adapters/{name}")
            shutil.rmtree(args.adapters_dir / name, ignore_errors=True)

    def pct(values: list[float], q: float) -> float:
        return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]

    table = {"http_p50_ms": statistics.median(wall), "http_p99_ms": pct(wall, 99),
             "server_p50_ms": statistics.median(server), "server_p99_ms": pct(server, 99)}
    print(f"| hot load over HTTP ({args.loads} loads) | p50 ms | p99 ms |\n|---|---|---|")
    print(f"| client wall time | {table['http_p50_ms']:.1f} | {table['http_p99_ms']:.1f} |")
    print(f"| server load_ms | {table['server_p50_ms']:.1f} | {table['server_p99_ms']:.1f} |")
    print("goal: p50 <= 50 ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"loads": args.loads, **table, "wall_ms": wall, "server_ms": server}, indent=2))


if __name__ == "__main__":
    main()
