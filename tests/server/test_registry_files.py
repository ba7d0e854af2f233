"""``server.registry.read_regular_file``: what the server reads from an adapter folder (weights at load time, the
extra files of ``GET /adapters/{name}/files/...``) is a regular file, never a link, a FIFO or an oversized file."""

from __future__ import annotations

import os

import pytest

from server.registry import NotRegularFile, read_regular_file


def reason(path, limit=100):
    with pytest.raises(NotRegularFile) as caught:
        read_regular_file(path, limit)
    return caught.value.reason, caught.value.size


def test_a_regular_file_is_read(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    assert read_regular_file(tmp_path / "f", 3) == b"abc"


def test_links_missing_files_folders_fifos_and_large_files_are_refused(tmp_path):
    (tmp_path / "real").write_bytes(b"abc")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "fifo")  # opening it must not wait for a writer
    (tmp_path / "large").write_bytes(b"x" * 101)
    assert reason(tmp_path / "link") == (NotRegularFile.LINK, 0)
    assert reason(tmp_path / "dangling") == (NotRegularFile.LINK, 0)
    assert reason(tmp_path / "absent") == (NotRegularFile.MISSING, 0)
    assert reason(tmp_path / "folder") == (NotRegularFile.MISSING, 0)
    assert reason(tmp_path / "fifo") == (NotRegularFile.MISSING, 0)
    assert reason(tmp_path / "large") == (NotRegularFile.LARGE, 101)
