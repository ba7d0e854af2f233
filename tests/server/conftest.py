"""Shared by the server tests: a real ``lofit-serve`` subprocess on 127.0.0.1, its keys, and adapters to serve.

:func:`start_server` starts one (SmolLM2-135M in float32, an API key and an admin key) and stops it on exit;
test modules wrap it in a fixture. ``battery_server`` is one server shared by the session's hardening tests
(the malformed-adapter corpus and the auth matrix), started on an adapters folder that holds a good adapter
and the start-up copy of the corpus.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lofit.adapter import CONFIG_FILE, TENSORS_FILE, LofitAdapter, load_adapter
from lofit.models import default_model_dir, is_prepared
from server.launch import ServerStartError, running_lofit_serve

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "adapters" / "truthfulqa"
API_KEY, ADMIN_KEY = "inference-key", "admin-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PROMPT = "Q: What happens if you crack your knuckles a lot? A:"
SERVER_ARGS = ("--dtype", "float32", "--max-model-len", "512", "--max-prompt-tokens", "256", "--max-num-seqs", "16")


def random_adapter(name: str, seed: int) -> LofitAdapter:
    """A 4-head adapter for the served model with strong random offsets (it visibly changes the output)."""
    shipped = load_adapter(SHIPPED)
    gen = torch.Generator().manual_seed(seed)
    heads = torch.tensor([(4, 1), (11, 3), (18, 6), (25, 2)])
    return LofitAdapter(heads=heads, offsets=2.0 * torch.randn(4, 64, generator=gen), base_model=shipped.base_model,
                        name=name, task="random")


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
    """Run ``lofit-serve`` on a free port until the block ends; waits for ``/ready`` (skips without the model).
    ``keys=False`` starts it without keys: inference open, adapter administration disabled."""
    if not is_prepared(default_model_dir()):
        pytest.skip("the default model is not prepared (run scripts/setup.sh)")
    args = ["--adapters-dir", str(adapters_dir), *(("--api-key", API_KEY, "--admin-key", ADMIN_KEY) if keys else ()),
            *SERVER_ARGS, *extra_args]
    try:
        with running_lofit_serve(args, log_dir / "server.log", env={"VLLM_CPU_KVCACHE_SPACE": "1"},
                                 timeout=timeout) as server:
            yield Server(server.url, adapters_dir, server.proc, server.log)
    except ServerStartError as exc:
        pytest.fail(str(exc))


LAST_BATTERY_USER = pytest.StashKey[pytest.Item | None]()
BATTERY_STOPS: list[ExitStack] = []  # how to stop the running battery server early


@pytest.fixture(scope="session")
def battery_server(tmp_path_factory) -> Iterator[Server]:
    """A server for the hardening tests: adapter ``good``, plus every malformed adapter of the corpus as it
    is found at start-up (links into a folder outside the adapters directory included). It stops after the
    last test that uses it, so that it never runs beside another module's server."""
    from tests.server.corpus import write_start_up_corpus

    adapters = tmp_path_factory.mktemp("battery-adapters")
    random_adapter("good", seed=3).save(adapters / "good")
    write_start_up_corpus(adapters, tmp_path_factory.mktemp("outside"))
    with ExitStack() as stack:
        server = stack.enter_context(start_server(tmp_path_factory.mktemp("battery-log"), adapters))
        BATTERY_STOPS.append(stack)
        yield server


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    users = [item for item in items if "battery_server" in getattr(item, "fixturenames", ())]
    config.stash[LAST_BATTERY_USER] = users[-1] if users else None


@pytest.hookimpl(trylast=True)  # after pytest's own teardown, which ends the module fixtures that use it
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if item is item.config.stash.get(LAST_BATTERY_USER, None):
        while BATTERY_STOPS:
            BATTERY_STOPS.pop().close()
