"""``lofit-serve --adapter-store``: a real server process whose adapters live in S3 (moto's S3 server from PyPI, in
this test process), as a replica of a scaled-out deployment meets them: uploads written through, adapters
published by others served on their first request, pinned references, reload, purge.
"""

from __future__ import annotations

import json

import httpx
import pytest

from lofit.adapter import CONFIG_FILE, TENSORS_FILE
from lofit.vllm.contract import pinned_reference
from server.adapter_store import AdapterStore
from tests.server.conftest import (
    ADMIN,
    AUTH,
    PROMPT,
    random_adapter,
    s3_requests,
    start_recording,
    start_server,
    upload_fields,
)

PREFIX = "serve"


@pytest.fixture(scope="module")
def store(s3_url) -> AdapterStore:
    return AdapterStore(f"s3://lofit-adapters/{PREFIX}", {"endpoint_url": s3_url})


@pytest.fixture(scope="module")
def server(tmp_path_factory, prepared_model_dir, s3_url):
    """The server inherits the test credentials ``s3_url`` puts in the environment."""
    cache = tmp_path_factory.mktemp("store-cache")
    args = ["--adapter-store", f"s3://lofit-adapters/{PREFIX}", "--adapter-store-options",
            json.dumps({"endpoint_url": s3_url}), "--adapter-cache-dir", str(cache), "--adapter-store-ttl", "3600"]
    with start_server(tmp_path_factory.mktemp("store-log"), tmp_path_factory.mktemp("empty-adapters"), args) as s:
        s.cache = cache
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as c:
        yield c


def publish_by_hand(store: AdapterStore, name: str, seed: int):
    a = random_adapter(name, seed=seed)
    for filename, data in a.files().items():
        store.fs.pipe_file(f"{store.root}/{name}/{filename}", data)
    return a


def complete(client, model: str, **extra) -> httpx.Response:
    return client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                                                **extra})


def test_an_adapter_published_to_the_store_is_served_on_its_first_request(server, client, store, s3_url):
    published = publish_by_hand(store, "fromstore", seed=11)
    assert client.get("/adapters/fromstore").status_code == 404  # not loaded yet
    start_recording(s3_url)
    first = complete(client, "fromstore")
    assert first.status_code == 200, first.text
    assert first.json()["model"] == "fromstore"
    reads = [r["url"].rsplit("/", 1)[1] for r in s3_requests(s3_url) if r["method"] == "GET"
             and "/fromstore/" in r["url"]]
    assert sorted(reads) == sorted([CONFIG_FILE, TENSORS_FILE])
    info = client.get("/adapters/fromstore").json()
    assert info["source"] == "store" and info["content_sha256"] == published.content_sha256
    assert (server.cache / "fromstore" / TENSORS_FILE).read_bytes() == published.files()[TENSORS_FILE]
    base = complete(client, client.get("/v1/models").json()["data"][0]["id"]).json()["choices"][0]["text"]
    assert first.json()["choices"][0]["text"] != base  # steered


def test_an_upload_writes_through_and_serves_like_the_same_content_from_the_store(server, client, store):
    a = random_adapter("uploaded", seed=12)
    files = a.files()
    answer = httpx.put(f"{server.url}/adapters/uploaded", headers=ADMIN, timeout=120,
                       files=upload_fields(files[CONFIG_FILE], files[TENSORS_FILE]))
    assert answer.status_code == 200, answer.text
    assert store.read("uploaded").tensors == files[TENSORS_FILE]
    assert store.read("uploaded", a.content_sha256).config == files[CONFIG_FILE]  # the immutable version
    twin = random_adapter("twin", seed=12)  # the same offsets under another name, fetched on a miss
    for filename, data in twin.files().items():
        store.fs.pipe_file(f"{store.root}/twin/{filename}", data)
    texts = [complete(client, name).json()["choices"][0]["text"] for name in ("uploaded", "twin")]
    assert texts[0] == texts[1]


def test_unknown_and_broken_adapters(server, client, store):
    missing = complete(client, "nowhere")
    assert missing.status_code == 404 and "nowhere" in missing.json()["error"]["message"]
    store.fs.pipe_file(f"{store.root}/broken/{CONFIG_FILE}", b"{not json")
    store.fs.pipe_file(f"{store.root}/broken/{TENSORS_FILE}", b"nothing")
    broken = client.post("/generate", json={"prompt": PROMPT, "max_tokens": 2, "adapter": "broken"})
    assert broken.status_code == 400
    assert "'broken' in the adapter store is not valid" in broken.json()["error"]["message"]
    assert "lofit-adapters" not in broken.json()["error"]["message"]  # where the store is stays on the server
    assert client.get("/adapters/broken").status_code == 404
    bad_ref = complete(client, "broken@" + "0" * 63)
    assert bad_ref.status_code == 404  # not a reference (63 digits): an unknown model


def test_pinned_reference_reload_and_purge(server, client, store):
    admin = httpx.Client(base_url=server.url, headers=ADMIN, timeout=120)
    old = publish_by_hand(store, "moving", seed=13)
    assert complete(client, "moving").status_code == 200
    new = publish_by_hand(store, "moving", seed=14)  # replaced by hand; the TTL (an hour) has not passed
    assert client.get("/adapters/moving").json()["content_sha256"] == old.content_sha256
    reloaded = admin.post("/adapters/moving/reload")
    assert reloaded.status_code == 200 and reloaded.json()["changed"] is True
    assert reloaded.json()["adapter"]["content_sha256"] == new.content_sha256
    old_ref = pinned_reference("moving", old.content_sha256)
    pinned = client.post("/generate", json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "adapter": old_ref})
    assert pinned.status_code == 404  # published by hand: the store kept no version of the old content
    current_ref = pinned_reference("moving", new.content_sha256)
    by_ref = client.post("/generate", json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0,
                                            "adapter": current_ref})
    by_name = client.post("/generate", json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0,
                                             "adapter": "moving"})
    assert by_ref.status_code == 200 and by_ref.json()["text"] == by_name.json()["text"]
    assert admin.post("/adapters/moving/reload", headers=AUTH).status_code == 403  # admin only
    purged = admin.delete("/adapters/moving", params={"purge": "true"})
    assert purged.status_code == 200 and purged.json()["unloaded"] is True
    assert "moving" not in store.names()
    assert complete(client, "moving").status_code == 404
    assert admin.post("/adapters/moving/reload").status_code == 404
    assert client.get("/adapters").json()["adapters"]  # others still loaded
    admin.close()
