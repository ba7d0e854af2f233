"""Shared by the server tests: a real ``lofit-serve`` subprocess on 127.0.0.1, its keys, and adapters to serve.

:func:`start_server` starts one (SmolLM2-135M in float32, an API key and an admin key) and stops it on exit;
test modules wrap it in a fixture. Two servers are shared by the session, each stopped right after the last test
that uses it: ``battery_server`` (the hardening tests: the malformed-adapter corpus and the auth matrix, on an
adapters folder that holds a good adapter and the start-up copy of the corpus) and ``peers`` (``lofit-serve``
beside vLLM's own OpenAI server: the conformance and real-client tests).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from lofit.adapter import CONFIG_FILE, TENSORS_FILE, LofitAdapter, load_adapter
from lofit.default_model import default_model_dir
from server.launch import ServerStartError, running_lofit_serve, stock_vllm_serve

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "adapters" / "truthfulqa"
API_KEY, ADMIN_KEY = "inference-key", "admin-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PROMPT = "Q: What happens if you crack your knuckles a lot? A:"
BASE = default_model_dir().name  # the served model's name
SERVER_ARGS = ("--dtype", "float32", "--max-model-len", "512", "--max-prompt-tokens", "256", "--max-num-seqs", "16")


def random_adapter(name: str, seed: int) -> LofitAdapter:
    """A 4-head adapter for the served model with strong random offsets (it visibly changes the output)."""
    return LofitAdapter.random(load_adapter(SHIPPED).base_model, name, [(4, 1), (11, 3), (18, 6), (25, 2)],
                               seed=seed, scale=2.0)


def upload_fields(config: bytes, tensors: bytes) -> dict[str, tuple[str, bytes]]:
    """The multipart fields of ``PUT /adapters/{name}``."""
    return {"adapter_config": (CONFIG_FILE, config), "adapter_tensors": (TENSORS_FILE, tensors)}


@dataclass
class Server:
    url: str
    adapters: Path
    proc: subprocess.Popen
    log: Path


@contextmanager
def start_server(log_dir: Path, adapters_dir: Path, extra_args: Sequence[str] = (), *, keys: bool = True,
                 timeout: float = 420) -> Iterator[Server]:
    """Run ``lofit-serve`` on a free port until the block ends; waits for ``/ready``. Callers need the fixture
    ``prepared_model_dir`` (the gate). ``keys=False`` starts it without keys: inference open, adapter
    administration disabled."""
    args = ["--adapters-dir", str(adapters_dir), *(("--api-key", API_KEY, "--admin-key", ADMIN_KEY) if keys else ()),
            *SERVER_ARGS, *extra_args]
    try:
        with running_lofit_serve(args, log_dir / "server.log", env={"VLLM_CPU_KVCACHE_SPACE": "1"},
                                 timeout=timeout) as server:
            yield Server(server.url, adapters_dir, server.proc, server.log)
    except ServerStartError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def s3_url(tmp_path_factory):
    """The URL of moto's S3 server (an S3 API from PyPI), with bucket ``lofit-adapters`` and a recorder of the
    requests it serves (:func:`start_recording`, :func:`s3_requests`). It runs in its own process: moto's server
    is a Flask app, and Flask's context-local proxies in this process would break vLLM engines started here later
    (vLLM's CPU platform inspects every module's globals when it registers its kernels)."""
    import sys
    import time

    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(key, value)
    port = _free_port()
    log = tmp_path_factory.mktemp("moto")
    env = {**os.environ, "MOTO_RECORDER_FILEPATH": str(log / "recording")}  # not the current directory
    with (log / "moto.log").open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                httpx.get(f"{url}/moto-api/", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        import boto3

        boto3.client("s3", endpoint_url=url).create_bucket(Bucket="lofit-adapters")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_recording(url: str) -> None:
    httpx.post(f"{url}/moto-api/recorder/reset-recording")
    httpx.post(f"{url}/moto-api/recorder/start-recording")


def s3_requests(url: str) -> list[dict]:
    return [json.loads(line) for line in httpx.get(f"{url}/moto-api/recorder/download-recording").text.splitlines()]


SHARED = ("main_server", "battery_server", "peers")  # session servers, each stopped after its last test
LAST_USERS = pytest.StashKey[dict[str, pytest.Item]]()
STOPS: dict[str, ExitStack] = {}  # how to stop each running shared server early


@pytest.fixture(scope="session")
def main_server(tmp_path_factory, prepared_model_dir) -> Iterator[Server]:
    """The server as users meet it (test_server, test_metrics, test_failed_inputs): the shipped ``truthfulqa``
    adapter, a random ``random4``, and two folders start-up must skip: ``broken`` (a bad tensors file) and one
    named as the served model."""
    adapters = tmp_path_factory.mktemp("adapters")
    shutil.copytree(SHIPPED, adapters / "truthfulqa")
    random_adapter("random4", seed=1).save(adapters / "random4")
    broken = adapters / "broken"
    shutil.copytree(SHIPPED, broken)
    (broken / "adapter.safetensors").write_bytes(b"not a safetensors file")
    random_adapter(BASE, seed=2).save(adapters / BASE)
    with ExitStack() as stack:
        server = stack.enter_context(start_server(tmp_path_factory.mktemp("log"), adapters))
        STOPS["main_server"] = stack
        yield server


@pytest.fixture(scope="module")
def main_client(main_server) -> Iterator[httpx.Client]:
    """An HTTP client of ``main_server`` with the inference key."""
    with httpx.Client(base_url=main_server.url, headers=AUTH, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def main_admin(main_server) -> Iterator[httpx.Client]:
    """An HTTP client of ``main_server`` with the admin key."""
    with httpx.Client(base_url=main_server.url, headers=ADMIN, timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def battery_server(tmp_path_factory, prepared_model_dir) -> Iterator[Server]:
    """A server for the hardening tests: adapter ``good``, plus every malformed adapter of the corpus as it
    is found at start-up (links into a folder outside the adapters directory included)."""
    from tests.server.corpus import write_start_up_corpus

    adapters = tmp_path_factory.mktemp("battery-adapters")
    random_adapter("good", seed=3).save(adapters / "good")
    write_start_up_corpus(adapters, tmp_path_factory.mktemp("outside"))
    with ExitStack() as stack:
        server = stack.enter_context(start_server(tmp_path_factory.mktemp("battery-log"), adapters))
        STOPS["battery_server"] = stack
        yield server


@dataclass
class Peers:
    """``lofit-serve`` (keys on; adapters ``truthfulqa``, shipped, and ``random4``) and vLLM's own OpenAI server
    (stock vLLM, no keys) on the same checkpoint, float32: the protocol peers of the conformance tests."""

    lofit: Server
    vllm: str
    base: str = BASE


@pytest.fixture(scope="session")
def peers(tmp_path_factory, prepared_model_dir) -> Iterator[Peers]:
    adapters = tmp_path_factory.mktemp("peer-adapters")
    shutil.copytree(SHIPPED, adapters / "truthfulqa")
    random_adapter("random4", seed=1).save(adapters / "random4")
    logs = tmp_path_factory.mktemp("peer-logs")
    with ExitStack() as stack:
        vllm = stack.enter_context(stock_vllm_serve(
            ["--model", str(default_model_dir()), "--served-model-name", BASE, "--dtype", "float32",
             "--max-model-len", "512", "--max-num-seqs", "16", "--gpu-memory-utilization", "0.1"],
            logs / "vllm-serve.log", env={"VLLM_CPU_KVCACHE_SPACE": "1"}))  # starts while lofit-serve starts
        lofit = stack.enter_context(start_server(logs, adapters, ["--max-prompt-tokens", "500"]))
        try:
            vllm.wait_ready(600)
        except ServerStartError as exc:
            pytest.fail(str(exc))
        STOPS["peers"] = stack
        yield Peers(lofit, vllm.url)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    last = {}
    for item in items:
        for name in SHARED:
            if name in getattr(item, "fixturenames", ()):
                last[name] = item
    config.stash[LAST_USERS] = last


@pytest.hookimpl(trylast=True)  # after pytest's own teardown, which ends the module fixtures that use it
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    for name, last in item.config.stash.get(LAST_USERS, {}).items():
        if item is last and name in STOPS:
            STOPS.pop(name).close()
