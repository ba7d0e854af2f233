"""Scale-out benchmarks: load-on-miss from an S3 adapter store, and two Ray Serve replicas against one.

    python -m bench.scale_out [--phase store|replicas|all] [--adapters 50] [--requests 48] [--out FILE]

``store``: ``lofit-serve --adapter-store s3://...`` against moto's S3 server (PyPI, in this process, loopback —
no network latency; a real S3 adds its round trips, two GETs per miss), ``--adapters`` adapters (8 heads, the
shipped size) published to the store by hand. For each, ``POST /adapters/{name}/reload`` on the fresh name is
timed (the server's ``load_ms``: the store read, validation against the served model, the node cache write and the
load on every worker — the work of a miss), then a first and a second ``/generate`` (1 token) naming a second
fresh adapter: their difference is what a request pays for a miss. Target: p50 ≤ 50 ms.

``replicas``: a local Ray cluster (2 raylets, one CPU each, on this one host) serving ``server.ray_app:app`` with 1
replica, then 2 (one core each); the same load (``--requests`` completions of 32 tokens, 8 at a time, over 4
adapters from the store) against each; requests per second and their ratio. Both replicas share this machine's 2
cores, its memory bandwidth and one S3 server.

Prints a table and writes JSON (default ``docs/benchmarks/scale_out.json``).
"""

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from bench.common import percentile, random_adapter
from lofit.default_model import default_model_dir
from lofit.heads import identity_from_checkpoint

REPO = Path(__file__).resolve().parents[1]
BUCKET, ADMIN_KEY = "lofit-bench", "bench-admin"
PROMPT = "Q: What happens if you crack your knuckles a lot? A:"
ENGINE = ["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "16", "--kv-cache-gib", "1"]


def s3_server(stack: ExitStack) -> str:
    """moto's S3 server in this process, with a bucket; its URL (and test credentials in the environment)."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise

    for key, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(key, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    stack.callback(server.stop)
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
    return url


def publish(url: str, prefix: str, names: list[str], seed: int) -> None:
    from server.adapter_store import AdapterStore

    store = AdapterStore(f"s3://{BUCKET}/{prefix}", {"endpoint_url": url})
    identity = identity_from_checkpoint(default_model_dir(), name=default_model_dir().name)
    for i, name in enumerate(names):
        adapter = random_adapter(identity, seed + i, name)
        store.write(name, adapter.files(), adapter.content_sha256)


def store_flags(url: str, prefix: str) -> list[str]:
    return ["--adapter-store", f"s3://{BUCKET}/{prefix}", "--adapter-store-options",
            json.dumps({"endpoint_url": url}), "--admin-key", ADMIN_KEY, *ENGINE]


def stats(samples: list[float]) -> dict:
    return {"p50": percentile(samples, 50), "p99": percentile(samples, 99), "mean": statistics.fmean(samples),
            "n": len(samples)}


def phase_store(count: int, log_dir: Path) -> dict:
    from server.launch import running_lofit_serve

    with ExitStack() as stack:
        url = s3_server(stack)
        reloads = [f"miss{i:03d}" for i in range(count)]
        firsts = [f"first{i:03d}" for i in range(count)]
        publish(url, "store", reloads + firsts, seed=1000)
        server = stack.enter_context(running_lofit_serve(
            ["--adapters-dir", str(log_dir / "no-adapters"), "--adapter-cache-dir", str(log_dir / "cache"),
             *store_flags(url, "store")], log_dir / "store-server.log", env={"VLLM_CPU_KVCACHE_SPACE": "1"}))
        client = stack.enter_context(httpx.Client(base_url=server.url, timeout=120,
                                                  headers={"Authorization": f"Bearer {ADMIN_KEY}"}))
        load_ms, wall_ms, miss_ms = [], [], []
        for name in reloads:
            started = time.perf_counter()
            answer = client.post(f"/adapters/{name}/reload")
            wall_ms.append((time.perf_counter() - started) * 1000)
            answer.raise_for_status()
            load_ms.append(answer.json()["load_ms"])
        for name in firsts:
            times = []
            for _ in range(2):
                started = time.perf_counter()
                client.post("/generate", json={"prompt": PROMPT, "max_tokens": 1, "adapter": name}).raise_for_status()
                times.append((time.perf_counter() - started) * 1000)
            miss_ms.append(times[0] - times[1])
    return {"server_load_ms": stats(load_ms), "reload_wall_ms": stats(wall_ms), "first_request_extra_ms":
            stats(miss_ms)}


def load(url: str, requests: int, adapters: list[str]) -> dict:
    def one(i: int) -> tuple[float, str]:
        started = time.perf_counter()
        answer = httpx.post(f"{url}/v1/completions", timeout=600, json={
            "model": adapters[i % len(adapters)], "prompt": PROMPT, "max_tokens": 32, "temperature": 0,
            "ignore_eos": True})
        answer.raise_for_status()
        return time.perf_counter() - started, answer.headers.get("x-lofit-replica", "")

    for name in adapters:  # every replica loads on its own miss during the run; warm one request each first
        one(adapters.index(name))
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(requests)))
    elapsed = time.perf_counter() - started
    per_replica: dict[str, int] = {}
    for _, replica in results:
        per_replica[replica] = per_replica.get(replica, 0) + 1
    return {"requests": requests, "seconds": elapsed, "requests_per_s": requests / elapsed,
            "output_tokens_per_s": requests * 32 / elapsed, "latency_p50_s": percentile([r[0] for r in results], 50),
            "per_replica": per_replica}


def phase_replicas(requests: int, log_dir: Path) -> dict:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from server.ray_app import app

    os.environ.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                       "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0",
                       "RAY_TMPDIR": tempfile.mkdtemp(prefix="rb-", dir="/tmp")})
    out = {}
    with ExitStack() as stack:
        url = s3_server(stack)
        adapters = [f"load{i}" for i in range(4)]
        publish(url, "replicas", adapters, seed=2000)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        stack.callback(cluster.shutdown)
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False, logging_level="warning")
        stack.callback(ray.shutdown)
        port = 18431
        serve.start(proxy_location="EveryNode", http_options={"host": "127.0.0.1", "port": port})
        stack.callback(serve.shutdown)
        env = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
        for replicas in (1, 2):
            started = time.perf_counter()
            serve.run(app({"flags": store_flags(url, "replicas"), "num_replicas": replicas, "num_cpus": 1,
                           "max_replicas_per_node": 1, "cpu_cores_per_replica": 1, "env_vars": env,
                           "cache_root": str(log_dir / f"cache-{replicas}")}), name="lofit", route_prefix="/")
            ready = time.perf_counter() - started
            out[f"{replicas}_replica"] = {**load(f"http://127.0.0.1:{port}", requests, adapters),
                                          "ready_s": ready}
            serve.delete("lofit")
    out["ratio_2_over_1"] = out["2_replica"]["requests_per_s"] / out["1_replica"]["requests_per_s"]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale_out", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=["store", "replicas", "all"], default="all")
    parser.add_argument("--adapters", type=int, default=50, help="fresh adapters timed in the store phase")
    parser.add_argument("--requests", type=int, default=48, help="completions per replica count")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "scale_out.json")
    args = parser.parse_args(argv)
    if args.adapters < 2 or args.requests < 8:
        parser.error("--adapters must be at least 2 and --requests at least 8")
    log_dir = Path(tempfile.mkdtemp(prefix="lofit-scale-out-"))
    result = {"machine": f"{os.cpu_count()} cores; replicas share them (2 raylets on 1 host)"}
    if args.phase in ("store", "all"):
        result["store"] = phase_store(args.adapters, log_dir)
    if args.phase in ("replicas", "all"):
        result["replicas"] = phase_replicas(args.requests, log_dir)
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} (logs in {log_dir})", file=sys.stderr)


def print_table(result: dict) -> None:
    if "store" in result:
        print("| load-on-miss from S3 (moto, loopback) | p50 ms | p99 ms | n |\n|---|---|---|---|")
        for key, label in (("server_load_ms", "server load_ms (read + validate + cache + workers)"),
                           ("reload_wall_ms", "POST /adapters/{name}/reload, client wall"),
                           ("first_request_extra_ms", "first request minus second (1 token)")):
            s = result["store"][key]
            print(f"| {label} | {s['p50']:.1f} | {s['p99']:.1f} | {s['n']} |")
    if "replicas" in result:
        r = result["replicas"]
        print("\n| Ray Serve replicas (one core each, same host) | req/s | tok/s | p50 s | per replica |\n"
              "|---|---|---|---|---|")
        for key in ("1_replica", "2_replica"):
            x = r[key]
            print(f"| {key.replace('_', ' ')} | {x['requests_per_s']:.2f} | {x['output_tokens_per_s']:.1f} | "
                  f"{x['latency_p50_s']:.2f} | {x['per_replica']} |")
        print(f"\nratio 2 replicas / 1 replica: {r['ratio_2_over_1']:.2f}x")


if __name__ == "__main__":
    main()
