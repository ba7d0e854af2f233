"""Malformed adapters, bad names and symbolic links against a real ``lofit-serve`` (the session's
``battery_server``).

Every case of :mod:`tests.server.corpus` arrives the three ways an adapter can: found in the adapters folder
at start-up (``GET /adapters`` lists it under ``skipped``), written there and loaded with ``POST /adapters``,
and uploaded with ``PUT /adapters/{name}``. Each is refused with a 4xx whose message names the problem; no
link leads the server to a file outside the adapters folder; a failed upload leaves no file behind; and
afterwards the server is still ready and still steers.
"""

from __future__ import annotations

import shutil
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lofit.adapter import CONFIG_FILE, TENSORS_FILE
from tests.server.conftest import ADMIN, AUTH, PROMPT, Server, upload_fields
from tests.server.corpus import (
    BAD_FOLDER_NAMES,
    BAD_NAMES,
    CASES,
    LINKS,
    PICKLE_MARKER,
    SECRET,
    Link,
    Malformed,
    adapter_files,
    upload_bytes,
    write_files,
)

FIELDS = {CONFIG_FILE: "adapter_config", TENSORS_FILE: "adapter_tensors"}  # multipart field of each file
CASE_IDS = [case.id for case in CASES]
LINK_IDS = [link.id for link in LINKS]
FOLDER_LINKS = [link for link in LINKS if "folder" in link.id or "dangling" in link.id]
FILE_LINKS = [link for link in LINKS if link not in FOLDER_LINKS]


@pytest.fixture(scope="module")
def server(battery_server: Server) -> Server:
    return battery_server


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def admin(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=ADMIN, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """A folder beside the adapters folder, for the targets of links."""
    return tmp_path_factory.mktemp("outside-runtime")


@pytest.fixture(scope="module")
def start_up_listing(client: httpx.Client) -> dict:
    response = client.get("/adapters")
    assert response.status_code == 200, response.text
    assert SECRET not in response.text
    return response.json()


def entries(folder: Path) -> set[str]:
    """Everything in ``folder``, hidden staging folders included."""
    return {p.name for p in folder.iterdir()}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (links not followed) and its content."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_refused(response: httpx.Response, status: int, problem: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == status
    assert problem in body["error"]["message"], body["error"]["message"]
    assert SECRET not in response.text


def loaded(client: httpx.Client) -> set[str]:
    return {a["name"] for a in client.get("/adapters").json()["adapters"]}


def good_upload(name: str) -> dict[str, tuple[str, bytes]]:
    """The upload fields of a valid adapter called ``name``."""
    files = adapter_files(name)
    return upload_fields(files[CONFIG_FILE], files[TENSORS_FILE])


def name_url(name: str) -> str:
    """``/adapters/<name>`` with every byte that could be read as a path step percent-encoded (dots too)."""
    return "/adapters/" + urllib.parse.quote(name, safe="").replace(".", "%2E")


# -- start-up --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES + LINKS, ids=CASE_IDS + LINK_IDS)
def test_start_up_skips_it_and_says_why(start_up_listing: dict, case: Malformed | Link):
    name = f"boot-{case.id}"
    assert name not in {a["name"] for a in start_up_listing["adapters"]}
    assert name in start_up_listing["skipped"], sorted(start_up_listing["skipped"])
    assert case.problem in start_up_listing["skipped"][name]


@pytest.mark.parametrize("key", sorted(BAD_FOLDER_NAMES))
def test_start_up_refuses_folders_not_named_as_adapters(start_up_listing: dict, key: str):
    name = BAD_FOLDER_NAMES[key]
    assert name not in {a["name"] for a in start_up_listing["adapters"]}
    if name.startswith("."):  # the server's own staging and backup folders are hidden: not even reported
        assert name not in start_up_listing["skipped"]
    else:
        assert "invalid adapter name" in start_up_listing["skipped"][name]


def test_start_up_loads_the_good_adapter(start_up_listing: dict):
    assert [a["name"] for a in start_up_listing["adapters"]] == ["good"]


# -- POST /adapters {"name"}: a folder written while the server runs ---------------------------------------

@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_load_by_name_refuses_it(server: Server, admin: httpx.Client, client: httpx.Client, case: Malformed):
    name = f"dir-{case.id}"
    write_files(server.adapters / name, case.files(name))
    assert_refused(admin.post("/adapters", json={"name": name}), 400, case.problem)
    assert client.get(f"/adapters/{name}").status_code == 404


@pytest.mark.parametrize("link", LINKS, ids=LINK_IDS)
def test_load_by_name_refuses_links(server: Server, admin: httpx.Client, client: httpx.Client, outside: Path,
                                    link: Link):
    name = f"dir-{link.id}"
    link.make(server.adapters / name, outside)
    before = snapshot(outside)
    assert_refused(admin.post("/adapters", json={"name": name}), 400, link.problem)
    assert name not in loaded(client), "a link was followed"
    assert snapshot(outside) == before


# -- PUT /adapters/{name}: uploads ----------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_upload_refuses_it_and_leaves_nothing(server: Server, admin: httpx.Client, client: httpx.Client,
                                              case: Malformed):
    name = f"up-{case.id}"
    fields = {FIELDS[filename]: (filename, data) for filename, data in upload_bytes(case.files(name)).items()}
    before = entries(server.adapters)
    status, problem = case.upload_expectation()
    assert_refused(admin.put(f"/adapters/{name}", files=fields), status, problem)
    assert entries(server.adapters) == before, "a failed upload left files behind"
    assert client.get(f"/adapters/{name}").status_code == 404


def test_a_bad_upload_over_a_loaded_adapter_changes_nothing(server: Server, admin: httpx.Client,
                                                            client: httpx.Client):
    before_files, before_info = snapshot(server.adapters / "good"), client.get("/adapters/good").json()
    bad = next(c for c in CASES if c.id == "offsets-nan").files("good")
    response = admin.put("/adapters/good", files=upload_fields(bad[CONFIG_FILE], bad[TENSORS_FILE]))
    assert_refused(response, 400, "NaN or Inf")
    assert snapshot(server.adapters / "good") == before_files
    assert client.get("/adapters/good").json()["content_sha256"] == before_info["content_sha256"]


@pytest.mark.parametrize("link", FOLDER_LINKS, ids=[link.id for link in FOLDER_LINKS])
def test_upload_refuses_a_name_that_is_a_link(server: Server, admin: httpx.Client, outside: Path, link: Link):
    name = f"uplink-{link.id}"
    link.make(server.adapters / name, outside)
    before = snapshot(outside)
    response = admin.put(f"/adapters/{name}", files=good_upload(name))
    assert_refused(response, 400, link.problem)
    assert (server.adapters / name).is_symlink() and snapshot(outside) == before, "the upload wrote through a link"


@pytest.mark.parametrize("link", FILE_LINKS, ids=[link.id for link in FILE_LINKS])
def test_upload_replaces_a_folder_of_links_without_writing_through_them(server: Server, admin: httpx.Client,
                                                                        outside: Path, link: Link):
    name = f"uplink-{link.id}"
    link.make(server.adapters / name, outside)
    before = snapshot(outside)
    response = admin.put(f"/adapters/{name}", files=good_upload(name))
    assert response.status_code == 200, response.text
    assert snapshot(outside) == before
    assert not any(p.is_symlink() for p in (server.adapters / name).iterdir())
    assert admin.delete(f"/adapters/{name}").json()["unloaded"] is True
    shutil.rmtree(server.adapters / name)


# -- names ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", sorted(k for k, v in BAD_NAMES.items() if v))  # PUT /adapters/ is another route
def test_upload_refuses_a_bad_name(server: Server, admin: httpx.Client, key: str):
    name = BAD_NAMES[key]
    before = entries(server.adapters)
    response = admin.put(name_url(name), files=good_upload(name))
    if "/" in name:  # the path has another step: no route has that shape
        assert_refused(response, 404, "Not Found")
    else:
        assert_refused(response, 400, "invalid adapter name")
    assert entries(server.adapters) == before


@pytest.mark.parametrize("key", sorted(BAD_NAMES))
def test_load_by_name_refuses_a_bad_name(admin: httpx.Client, key: str):
    assert_refused(admin.post("/adapters", json={"name": BAD_NAMES[key]}), 422, "body.name: String should match")


@pytest.mark.parametrize("key", sorted(k for k, v in BAD_NAMES.items() if v and "/" not in v))
def test_unload_refuses_a_bad_name(admin: httpx.Client, key: str):
    assert_refused(admin.delete(name_url(BAD_NAMES[key])), 400, "invalid adapter name")


# -- limits -----------------------------------------------------------------------------------------------

def test_a_chunked_body_past_the_limit_is_refused(client: httpx.Client):
    """No Content-Length to check up front: the server counts the body as it arrives."""

    def body() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(2048):
            yield b"a" * 1024
        yield b'"}'

    response = client.post("/generate", content=body(), headers={"content-type": "application/json"})
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert_refused(response, 400, "request body larger than 1048576 bytes")


# -- afterwards ---------------------------------------------------------------------------------------------

def test_after_the_corpus_the_server_still_serves(server: Server, client: httpx.Client):
    assert not PICKLE_MARKER.exists(), "something unpickled the disguised pickle"
    hidden = {p for p in entries(server.adapters) if p.startswith(".")}
    assert hidden == {n for n in BAD_FOLDER_NAMES.values() if n.startswith(".")}, "staging folders were left behind"
    assert client.get("/ready").status_code == 200
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    plain = client.post("/generate", json=body)
    steered = client.post("/generate", json={**body, "adapter": "good"})
    assert plain.status_code == 200 and steered.status_code == 200, (plain.text, steered.text)
    assert steered.json()["adapter"]["name"] == "good"
    assert plain.json()["text"] != steered.json()["text"]
