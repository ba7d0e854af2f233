"""``server.launch``: the subprocess launcher the server tests, reliability scripts and benchmarks share, run on
real processes (a stdlib HTTP server stands in for ``lofit-serve``)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from server.launch import ServerProcess, ServerStartError, free_port

# Serves the current directory and first starts a child that would outlive it (the role of vLLM's engine core).
SERVER_WITH_CHILD = """
import http.server, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
open(sys.argv[2], "w").write(str(child.pid))
http.server.test(HandlerClass=http.server.SimpleHTTPRequestHandler, port=int(sys.argv[1]), bind="127.0.0.1")
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie waiting for its reaper counts as gone
        return stat.read().split(")")[-1].split()[0] != "Z"


def test_ready_then_stop_ends_the_server_and_its_children(tmp_path: Path):
    port, pid_file = free_port(), tmp_path / "child.pid"
    server = ServerProcess([sys.executable, "-c", SERVER_WITH_CHILD, str(port), str(pid_file)], port,
                           tmp_path / "logs" / "server.log", ready_path="/", cwd=tmp_path)
    with server:
        assert server.wait_ready(timeout=60) > 0
        assert server.url == f"http://127.0.0.1:{port}"
        child = int(pid_file.read_text())
        assert alive(child)
    assert server.proc.poll() is not None
    deadline = time.time() + 10
    while alive(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(child), "the server's child outlived stop()"


def test_a_server_that_exits_early_raises_with_its_log(tmp_path: Path):
    port = free_port()
    server = ServerProcess([sys.executable, "-c", "print('no model here'); raise SystemExit(3)"], port,
                           tmp_path / "server.log", name="broken")
    with server, pytest.raises(ServerStartError, match=r"(?s)broken exited with 3.*no model here"):
        server.wait_ready(timeout=60)


def test_a_server_that_never_answers_times_out(tmp_path: Path):
    command = [sys.executable, "-c", "import time; print('loading', flush=True); time.sleep(300)"]
    server = ServerProcess(command, free_port(), tmp_path / "server.log", name="slow")
    with server, pytest.raises(ServerStartError, match=r"(?s)slow was not ready after 2 s.*loading"):
        server.wait_ready(timeout=2)
    assert server.proc.returncode is not None
