"""Hot adapter load latency through HTTP: ``POST /adapters`` for ``--loads`` fresh adapters, then unload them.

Run against a live server whose adapters directory you can write to:

    lofit-serve --admin-key KEY &
    python -m bench.hot_load --url http://127.0.0.1:8000 --admin-key KEY --adapters-dir adapters [--loads 20]

Each adapter (8 heads, the shipped adapter's size) is written to the adapters directory first; only the HTTP
load is timed (validation against the served model, the load on every worker, and the registry update).
The adapters are unloaded and their folders removed afterwards. Prints a table and writes JSON.
``python -m bench.run_all`` calls :func:`measure_hot_load` against the server it starts
(``bench/serving/phase_http.py``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import httpx

from bench.common import percentile, random_adapter
from lofit.default_model import default_model_dir
from lofit.heads import identity_from_checkpoint


def measure_hot_load(url: str, admin_key: str, adapters_dir: Path, model: Path, loads: int,
                     prefix: str = "bench-hot-") -> dict:
    """Write ``loads`` fresh adapters into ``adapters_dir``, time each ``POST /adapters``, then unload and
    delete them. Returns p50/p99 of the client wall time and of the server's ``load_ms``, and the samples."""
    identity = identity_from_checkpoint(model, name=model.name)
    names = [f"{prefix}{i:03d}" for i in range(loads)]
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin_key}"}, timeout=60)
    wall, server = [], []
    try:
        for i, name in enumerate(names):
            random_adapter(identity, 10_000 + i, name).save(adapters_dir / name)
            start = time.perf_counter()
            response = client.post("/adapters", json={"name": name})
            wall.append((time.perf_counter() - start) * 1000)
            response.raise_for_status()
            server.append(response.json()["load_ms"])
    finally:
        for name in names:
            client.delete(f"/adapters/{name}")
            shutil.rmtree(adapters_dir / name, ignore_errors=True)
        client.close()
    return {"loads": loads, "http_p50_ms": statistics.median(wall), "http_p99_ms": percentile(wall, 99),
            "server_p50_ms": statistics.median(server), "server_p99_ms": percentile(server, 99),
            "wall_ms": wall, "server_ms": server}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hot_load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--admin-key", required=True)
    parser.add_argument("--adapters-dir", type=Path, default=Path("adapters"))
    parser.add_argument("--model", type=Path, default=default_model_dir())
    parser.add_argument("--loads", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench/results/hot_load.json"))
    args = parser.parse_args()

    table = measure_hot_load(args.url, args.admin_key, args.adapters_dir, args.model, args.loads)
    print(f"| hot load over HTTP ({args.loads} loads) | p50 ms | p99 ms |\n|---|---|---|")
    print(f"| client wall time | {table['http_p50_ms']:.1f} | {table['http_p99_ms']:.1f} |")
    print(f"| server load_ms | {table['server_p50_ms']:.1f} | {table['server_p99_ms']:.1f} |")
    print("goal: p50 <= 50 ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
