"""``lofit-serve`` on Ray Serve (server/ray_app.py, server/ray_cluster.py): two replicas on a local Ray cluster of
two raylets on this one host (one CPU each; simulated nodes: one kernel, one disk, one loopback), with moto's S3
server as the shared adapter store. What is checked: an adapter uploaded through one replica is served by the
other from the store (the store's request log and the other replica's own cache folder), with the tokens of the
transformers reference; Serve's multiplexing keeps an adapter's requests on the replica that holds it; every
replica's metrics in one page; an unload reaches both; a killed replica is replaced and serves again, and only
requests in flight on it fail.
"""

from __future__ import annotations

import concurrent.futures
import os
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import torch

from lofit.adapter import CONFIG_FILE, TENSORS_FILE
from lofit.default_model import default_model_dir
from tests.server.conftest import (
    ADMIN,
    ADMIN_KEY,
    API_KEY,
    AUTH,
    PROMPT,
    SERVER_ARGS,
    random_adapter,
    s3_requests,
    start_recording,
    upload_fields,
)

ray = pytest.importorskip("ray", reason="Ray Serve is in the dev extra (pip install -e .[dev])")
REPLICA = "x-lofit-replica"
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"}  # header-less requests may go to either replica


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_url(tmp_path_factory, prepared_model_dir, s3_url):
    """Two raylets, Serve with the ``lofit`` application (2 replicas, one per raylet) and ``lofit-cluster``."""
    from ray import serve
    from ray.cluster_utils import Cluster

    from server.ray_app import app
    from server.ray_cluster import cluster_app

    saved = {k: os.environ.get(k) for k in (*RAY_ENV, "RAY_TMPDIR")}
    os.environ.update(RAY_ENV)
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: socket paths have a limit
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False, logging_level="warning")
    port = free_port()
    serve.start(proxy_location="EveryNode", http_options={"host": "127.0.0.1", "port": port})
    cache_root = tmp_path_factory.mktemp("replica-caches")
    flags = ["--adapter-store", "s3://lofit-adapters/ray", "--adapter-store-options",
             f'{{"endpoint_url": "{s3_url}"}}', "--api-key", API_KEY, "--admin-key", ADMIN_KEY, "--kv-cache-gib", "1",
             *SERVER_ARGS]
    env = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    try:
        serve.run(app({"flags": flags, "num_replicas": 2, "max_replicas_per_node": 1, "num_cpus": 1,
                       "cpu_cores_per_replica": 1, "cache_root": str(cache_root), "health_check_period_s": 2,
                       "env_vars": env}), name="lofit", route_prefix="/")
        serve.run(cluster_app({"target_app": "lofit"}), name="lofit-cluster", route_prefix="/cluster")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="module")
def client(serve_url):
    with httpx.Client(base_url=serve_url, headers=AUTH, timeout=300) as c:
        yield c


def replicas(client) -> list[dict]:
    answer = client.get("/cluster/replicas")
    assert answer.status_code == 200, answer.text
    return answer.json()["replicas"]


def complete(client, model: str, max_tokens: int = 8, headers: dict | None = None) -> httpx.Response:
    return client.post("/v1/completions", headers=headers or {}, json={
        "model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True})


def reference_tokens(adapter, new_tokens: int) -> list[int]:
    """Greedy tokens of the transformers reference (lofit.intervene) steered by ``adapter``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lofit.intervene import apply_adapters, combine

    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(default_model_dir())(PROMPT)["input_ids"]
    with torch.no_grad(), apply_adapters(model, combine([(adapter, 1.0)])):
        out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(ids):].tolist()


def test_two_replicas_on_two_raylets_with_their_own_caches(client):
    found = replicas(client)
    assert len(found) == 2
    assert len({r["node"] for r in found}) == 2 and len({r["cache_dir"] for r in found}) == 2
    assert httpx.get(f"{client.base_url}/cluster/replicas").status_code == 401  # the inference key, as /adapters


def test_an_upload_through_one_replica_is_served_by_the_other_from_the_store(client, s3_url):
    adapter = random_adapter("shared", seed=21)
    files = adapter.files()
    uploaded = client.put("/adapters/shared", headers=ADMIN, files=upload_fields(files[CONFIG_FILE],
                                                                                 files[TENSORS_FILE]))
    assert uploaded.status_code == 200, uploaded.text
    writer = uploaded.headers[REPLICA]
    start_recording(s3_url)
    answers = {}
    for _ in range(40):  # no multiplexing header: Serve spreads requests over both replicas
        answer = complete(client, "shared")
        assert answer.status_code == 200, answer.text
        answers.setdefault(answer.headers[REPLICA], answer.json())
        if len(answers) == 2:
            break
    assert set(answers) == {r["replica"] for r in replicas(client)}
    reader = next(r for r in replicas(client) if r["replica"] != writer)
    reads = [r["url"].rsplit("/", 1)[1] for r in s3_requests(s3_url) if r["method"] == "GET" and "/ray/shared/"
             in r["url"]]
    assert sorted(reads) == sorted([CONFIG_FILE, TENSORS_FILE])  # the other replica read it once, from the store
    assert reader["store_fetches"] == 1 and "shared" in reader["adapters"]
    assert (Path(reader["cache_dir"]) / "shared" / TENSORS_FILE).read_bytes() == files[TENSORS_FILE]
    tokens = [a["choices"][0]["token_ids"] for a in answers.values()]
    assert tokens[0] == tokens[1] == reference_tokens(adapter, 8)


def test_multiplexing_keeps_an_adapters_requests_on_the_replica_that_holds_it(client):
    header = {"serve_multiplexed_model_id": "shared"}
    assert complete(client, "shared", headers=header).status_code == 200
    time.sleep(1.5)  # the replica reports the adapter to Serve's controller (every 0.1 s), which tells the proxy
    seen = {complete(client, "shared", max_tokens=1, headers=header).headers[REPLICA] for _ in range(10)}
    assert len(seen) == 1
    unknown = complete(client, "nowhere", headers={"serve_multiplexed_model_id": "nowhere"})
    assert unknown.status_code == 404  # no replica holds it: served (refused) by one, never a routing failure


def test_every_replicas_metrics_in_one_page(client):
    from prometheus_client.parser import text_string_to_metric_families

    page = client.get("/cluster/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(page)}
    running = families["vllm:num_requests_running"]
    assert {s.labels["replica"] for s in running.samples} == {r["replica"] for r in replicas(client)}
    assert "vllm:lora_requests_info" in families and "lofit_requests" in families


def test_an_unload_reaches_every_replica(client):
    assert all("shared" in r["adapters"] for r in replicas(client))
    refused = client.delete("/cluster/adapters/shared")  # the inference key: each replica refuses
    assert refused.status_code == 403 and {v["status"] for v in refused.json()["replicas"].values()} == {403}
    assert client.post("/cluster/generate", json={"prompt": "x"}).status_code == 404  # adapter calls only
    unloaded = client.delete("/cluster/adapters/shared", headers=ADMIN)
    assert unloaded.status_code == 200 and unloaded.json()["ok"], unloaded.text
    assert len(unloaded.json()["replicas"]) == 2
    assert all("shared" not in r["adapters"] for r in replicas(client))


def test_a_killed_replica_is_replaced_and_only_its_requests_fail(client):
    before = replicas(client)
    victim = before[1]
    actor = ray.get_actor(f"SERVE_REPLICA::lofit#LofitReplica#{victim['replica']}", namespace="serve")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(complete, client, "shared", 48) for _ in range(8)]
        time.sleep(3)  # requests are running on both replicas
        ray.kill(actor, no_restart=True)
        outcomes = [f.result() for f in futures]
    served_by = [o.headers.get(REPLICA) for o in outcomes if o.status_code == 200]
    failed = [o for o in outcomes if o.status_code != 200]
    assert failed, "no request was in flight on the killed replica"
    assert all(o.status_code == 500 for o in failed)  # Serve's proxy: the replica died under the request
    assert set(served_by) <= {before[0]["replica"], victim["replica"]} and before[0]["replica"] in served_by
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        now = replicas(client)
        if len(now) == 2 and victim["replica"] not in {r["replica"] for r in now}:
            break
        time.sleep(5)
    else:
        pytest.fail("Serve did not replace the killed replica within 10 minutes")
    replacement = next(r for r in now if r["replica"] != before[0]["replica"])
    assert replacement["rank"] == victim["rank"] and replacement["cache_dir"] == victim["cache_dir"]
    for _ in range(40):
        answer = complete(client, "shared")
        assert answer.status_code == 200, answer.text
        if answer.headers[REPLICA] == replacement["replica"]:
            break
    else:
        pytest.fail("the replacement replica served none of 40 requests")
