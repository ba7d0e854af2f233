"""The shared adapter store and load-on-miss (server/adapter_store.py, server/adapter_misses.py), fast: real
fsspec stores (``memory://``, ``file://``, and S3 through moto's in-process S3 server), the real registry and
the real worker method on a real adapter bank; only the engine's RPC transport is replaced by a direct call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import httpx
import pytest

from lofit.adapter import CONFIG_FILE, MAX_TENSORS_BYTES, TENSORS_FILE, LofitAdapter
from lofit.vllm.bank import AdapterBank, install_bank
from lofit.vllm.contract import pinned_reference
from lofit.vllm.worker import LofitWorkerMethods
from server.adapter_misses import LoadOnMiss, StoreLoader
from server.adapter_store import VERSIONS, AdapterStore, StoreMiss, StoreUnavailable
from server.registry import FROM_STORE, AdapterCapacity, AdapterRegistry, InvalidAdapter, UnknownAdapter
from server.steering import named_adapters
from tests.server.conftest import s3_requests, start_recording

HEADS = [(0, 1), (2, 3), (4, 5)]


class InProcessEngine:
    """The engine as the registry sees it, with ``collective_rpc`` a direct call of the worker's method on this
    replica's own adapter bank (the transport is the one part replaced)."""

    def __init__(self, base) -> None:
        self.bank = AdapterBank(base, capacity=16, max_num_tokens=8)
        self.worker = LofitWorkerMethods()
        self.calls: list[str] = []

    async def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None) -> list:
        install_bank(self.bank)
        self.calls.append(method)
        await asyncio.sleep(0)  # a real RPC yields to the event loop
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]


@pytest.fixture(params=["memory", "file", "s3"])
def store(request, tmp_path) -> AdapterStore:
    if request.param == "memory":
        return AdapterStore(f"memory://lofit-{request.node.name}")
    if request.param == "file":
        return AdapterStore(f"file://{tmp_path / 'store'}")
    url = request.getfixturevalue("s3_url")
    return AdapterStore(f"s3://lofit-adapters/{request.node.name}", {"endpoint_url": url})


def replica(stories_identity, store: AdapterStore | None, cache: Path, ttl: float = 3600.0,
            max_adapters: int = 256) -> StoreLoader:
    """One replica's registry and loader over ``store`` (its own bank and cache folder)."""
    if store is not None:
        with contextlib.suppress(StoreUnavailable):  # as the server: it starts, and answers 503 meanwhile
            store.prepare()
    registry = AdapterRegistry(cache.parent / "adapters-dir", stories_identity, InProcessEngine(stories_identity),
                               max_adapters=max_adapters, reserved=frozenset({"base"}))
    return StoreLoader(registry, store, cache, ttl)


def adapter(base, name: str, seed: int) -> LofitAdapter:
    return LofitAdapter.random(base, name, HEADS, seed=seed)


def publish_by_hand(store: AdapterStore, a: LofitAdapter) -> None:
    """What ``aws s3 cp -r adapters/x s3://bucket/x`` does: the current content only, no ``.versions``."""
    for filename, data in a.files().items():
        store.fs.makedirs(f"{store.root}/{a.name}", exist_ok=True)
        store.fs.pipe_file(f"{store.root}/{a.name}/{filename}", data)


def run(coroutine):
    return asyncio.run(coroutine)


def test_an_upload_through_one_replica_is_served_by_another_from_the_store(stories_identity, store, tmp_path):
    a, b = replica(stories_identity, store, tmp_path / "a" / "cache"), replica(stories_identity, store,
                                                                                tmp_path / "b" / "cache")
    up = adapter(stories_identity, "tqa", seed=1)
    record, changed = run(a.publish("tqa", up.files()))
    assert changed and record.source == FROM_STORE
    assert store.names() == ["tqa"]
    assert store.fs.exists(f"{store.root}/{VERSIONS}/tqa/{up.content_sha256}/{CONFIG_FILE}")
    assert "tqa" not in b.registry.records
    run(b.ensure({"tqa"}))
    assert b.registry.records["tqa"].adapter.content_sha256 == up.content_sha256
    assert b.registry.engine.bank.loaded() == {"tqa": up.content_sha256}
    assert (tmp_path / "b" / "cache" / "tqa" / TENSORS_FILE).read_bytes() == up.files()[TENSORS_FILE]
    assert b.fetches == 1 and b.registry.engine.calls == ["lofit_load_bytes"]  # bytes, not a path
    run(b.ensure({"tqa"}))
    assert b.fetches == 1  # loaded: no second read


def test_a_name_the_store_lacks_is_left_to_the_route_404(stories_identity, store, tmp_path):
    loader = replica(stories_identity, store, tmp_path / "cache")
    run(loader.ensure({"nope", "base"}))
    assert loader.registry.records == {} and loader.fetches == 0
    with pytest.raises(UnknownAdapter):
        run(loader.refresh("nope"))


def test_concurrent_misses_for_one_name_fetch_once(stories_identity, s3_url, tmp_path):
    store = AdapterStore("s3://lofit-adapters/concurrent", {"endpoint_url": s3_url})
    publish_by_hand(store, adapter(stories_identity, "hot", seed=2))
    loader = replica(stories_identity, store, tmp_path / "cache")
    start_recording(s3_url)

    async def many():
        await asyncio.gather(*(loader.ensure({"hot"}) for _ in range(12)))

    run(many())
    httpx.post(f"{s3_url}/moto-api/recorder/stop-recording")
    gets = [r for r in s3_requests(s3_url) if r["method"] == "GET" and "/concurrent/hot/" in r["url"]]
    assert loader.fetches == 1 and loader.registry.engine.calls == ["lofit_load_bytes"]
    assert sorted(r["url"].rsplit("/", 1)[1] for r in gets) == sorted([CONFIG_FILE, TENSORS_FILE])  # one read each


def test_freshness_reloads_changed_content_and_unloads_what_left_the_store(stories_identity, store, tmp_path):
    writer = replica(stories_identity, store, tmp_path / "w")
    first, second = adapter(stories_identity, "x", seed=3), adapter(stories_identity, "x", seed=4)
    run(writer.publish("x", first.files()))
    stale = replica(stories_identity, store, tmp_path / "stale", ttl=3600)
    fresh = replica(stories_identity, store, tmp_path / "fresh", ttl=0)
    for loader in (stale, fresh):
        run(loader.ensure({"x"}))
    run(writer.publish("x", second.files()))
    for loader in (stale, fresh):
        run(loader.ensure({"x"}))
    assert stale.registry.records["x"].adapter.content_sha256 == first.content_sha256  # within its TTL
    assert fresh.registry.records["x"].adapter.content_sha256 == second.content_sha256
    assert run(stale.refresh("x")).adapter.content_sha256 == second.content_sha256  # the explicit reload
    assert store.delete("x") and not store.delete("x")
    run(fresh.ensure({"x"}))
    assert "x" not in fresh.registry.records and fresh.registry.engine.bank.loaded() == {}


def test_a_pinned_reference_serves_exactly_its_content(stories_identity, store, tmp_path):
    writer = replica(stories_identity, store, tmp_path / "w")
    old, new = adapter(stories_identity, "x", seed=5), adapter(stories_identity, "x", seed=6)
    run(writer.publish("x", old.files()))
    run(writer.publish("x", new.files()))
    reader = replica(stories_identity, store, tmp_path / "r", ttl=0)
    old_ref, new_ref = pinned_reference("x", old.content_sha256), pinned_reference("x", new.content_sha256)
    run(reader.ensure({"x", old_ref, new_ref}))
    loaded = reader.registry.engine.bank.loaded()
    assert loaded == {"x": new.content_sha256, old_ref: old.content_sha256, new_ref: new.content_sha256}
    assert reader.fetches == 2  # x and x@old; x@new is the loaded content of x: its own bytes, no read
    missing = pinned_reference("x", "0" * 64)
    run(reader.ensure({missing}))
    assert missing not in reader.registry.records


def test_a_pinned_reference_of_a_hand_published_or_local_adapter(stories_identity, store, tmp_path):
    by_hand = adapter(stories_identity, "hand", seed=7)
    publish_by_hand(store, by_hand)  # no .versions: the current content is the one asked for
    loader = replica(stories_identity, store, tmp_path / "c")
    run(loader.ensure({pinned_reference("hand", by_hand.content_sha256)}))
    assert pinned_reference("hand", by_hand.content_sha256) in loader.registry.records
    local = replica(stories_identity, None, tmp_path / "none")  # no store: a loaded adapter's own content
    run(local.registry.load_files("hand", by_hand.files(), "adapters-dir", None))
    ref = pinned_reference("hand", by_hand.content_sha256)
    run(local.ensure({ref, pinned_reference("hand", "f" * 64)}))
    assert set(local.registry.records) == {"hand", ref}


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".versions", "x@" + "A" * 64, "x@abc", "é"])
def test_names_that_could_leave_the_store_are_never_read(stories_identity, store, tmp_path, name):
    assert named_adapters({"model": name, "adapters": {name: 1.0}, "vllm_xargs": {"lofit_adapter": name}}) == set()
    loader = replica(stories_identity, store, tmp_path / "c")
    with pytest.raises(InvalidAdapter):
        loader.registry.check_reference(name)
    with pytest.raises(InvalidAdapter):
        run(loader.ensure({name}))
    assert loader.fetches == 0


def broken_objects(base) -> dict[str, dict[str, bytes]]:
    good = adapter(base, "bad", seed=8).files()
    other = adapter(base, "bad", seed=9).files()
    foreign = LofitAdapter.random(base.from_dict({**base.to_dict(), "fingerprint": "f" * 16}), "bad", HEADS,
                                  seed=1).files()
    renamed = adapter(base, "other", seed=8).files()
    return {
        "not JSON": {CONFIG_FILE: b"{not json", TENSORS_FILE: good[TENSORS_FILE]},
        "not safetensors": {CONFIG_FILE: good[CONFIG_FILE], TENSORS_FILE: b"\x00" * 64},
        "mixed from two adapters": {CONFIG_FILE: good[CONFIG_FILE], TENSORS_FILE: other[TENSORS_FILE]},
        "another base model": foreign,
        "another name inside": renamed,
        "oversized tensors": {CONFIG_FILE: good[CONFIG_FILE], TENSORS_FILE: b"\x00" * (MAX_TENSORS_BYTES + 10)},
    }


@pytest.mark.parametrize("fault", ["not JSON", "not safetensors", "mixed from two adapters", "another base model",
                                   "another name inside", "oversized tensors"])
def test_a_broken_object_is_refused_and_nothing_is_loaded(stories_identity, tmp_path, fault):
    store = AdapterStore(f"memory://lofit-broken-{fault.replace(' ', '-')}")
    for filename, data in broken_objects(stories_identity)[fault].items():
        store.fs.pipe_file(f"{store.root}/bad/{filename}", data)
    loader = replica(stories_identity, store, tmp_path / "c")
    with pytest.raises(InvalidAdapter, match="adapter 'bad' in the adapter store is not valid"):
        run(loader.ensure({"bad"}))
    assert loader.registry.records == {} and loader.registry.engine.bank.loaded() == {}
    assert not (tmp_path / "c" / "bad").exists()


def test_an_oversized_object_is_not_downloaded_whole(stories_identity, s3_url, tmp_path):
    store = AdapterStore("s3://lofit-adapters/oversized", {"endpoint_url": s3_url})
    files = broken_objects(stories_identity)["oversized tensors"]
    for filename, data in files.items():
        store.fs.pipe_file(f"{store.root}/bad/{filename}", data)
    start_recording(s3_url)
    with pytest.raises(InvalidAdapter, match="far larger than any LoFiT adapter"):
        run(replica(stories_identity, store, tmp_path / "c").ensure({"bad"}))
    httpx.post(f"{s3_url}/moto-api/recorder/stop-recording")
    ranges = [r["headers"].get("Range") for r in s3_requests(s3_url) if r["url"].endswith(TENSORS_FILE)]
    assert ranges and all(r == f"bytes=0-{MAX_TENSORS_BYTES}" for r in ranges)


def test_a_torn_update_is_read_again(stories_identity, tmp_path):
    """A reader that meets new tensors beside the old config (a writer between its two PUTs) reads again."""
    store = AdapterStore("memory://lofit-torn")
    old, new = adapter(stories_identity, "t", seed=10), adapter(stories_identity, "t", seed=11)
    store.fs.pipe_file(f"{store.root}/t/{CONFIG_FILE}", old.files()[CONFIG_FILE])
    store.fs.pipe_file(f"{store.root}/t/{TENSORS_FILE}", new.files()[TENSORS_FILE])
    loader = replica(stories_identity, store, tmp_path / "c")
    read = store.read

    def finishing_write(name, sha=None):
        stored = read(name, sha)
        store.fs.pipe_file(f"{store.root}/t/{CONFIG_FILE}", new.files()[CONFIG_FILE])  # the writer's second PUT
        return stored

    store.read = finishing_write
    run(loader.ensure({"t"}))
    assert loader.registry.records["t"].adapter.content_sha256 == new.content_sha256


def test_the_least_recently_used_store_adapter_makes_room(stories_identity, tmp_path):
    store = AdapterStore("memory://lofit-lru")
    for i in range(3):
        publish_by_hand(store, adapter(stories_identity, f"a{i}", seed=20 + i))
    loader = replica(stories_identity, store, tmp_path / "c", max_adapters=2)
    run(loader.ensure({"a0", "a1"}))
    with pytest.raises(AdapterCapacity, match="used in the last 2 s"):  # both may be on their way to the engine
        run(loader.ensure({"a2"}))
    records = loader.registry.records
    records["a0"].last_used -= 10
    records["a1"].last_used -= 20  # a0 used after a1, both a while ago
    run(loader.ensure({"a2"}))
    assert set(loader.registry.records) == {"a0", "a2"}
    assert set(loader.registry.engine.bank.loaded()) == {"a0", "a2"}


def test_an_unreachable_store_is_unavailable_not_missing(stories_identity, tmp_path):
    store = AdapterStore("s3://lofit-adapters/x", {"endpoint_url": "http://127.0.0.1:9", "config_kwargs": {
        "retries": {"max_attempts": 1}, "connect_timeout": 1}})
    with pytest.raises(StoreUnavailable, match="cannot read s3://lofit-adapters/x"):
        store.read("a")
    loader = replica(stories_identity, store, tmp_path / "c")
    with pytest.raises(StoreUnavailable):
        run(loader.ensure({"a"}))


def test_file_store_writes_leave_no_partial_files(stories_identity, tmp_path):
    store = AdapterStore(f"file://{tmp_path / 'store'}")
    a = adapter(stories_identity, "x", seed=30)
    store.write("x", a.files(), a.content_sha256)
    leftovers = [p for p in (tmp_path / "store").rglob("*") if p.name.startswith(".") and p.name != VERSIONS]
    assert leftovers == []
    assert (tmp_path / "store" / "x" / CONFIG_FILE).read_bytes() == a.files()[CONFIG_FILE]
    with pytest.raises(StoreMiss):
        store.read("y")


def test_an_unknown_protocol_is_a_clear_error():
    with pytest.raises(ValueError, match="adapter store 'nosuch://x'"):
        AdapterStore("nosuch://x")


def middleware_app(loader: StoreLoader):
    """A bare Starlette app behind :class:`LoadOnMiss` whose route echoes the body it received and what is
    loaded by then."""
    from types import SimpleNamespace

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def echo(request):
        return JSONResponse({"body": (await request.body()).decode(), "loaded": sorted(loader.registry.records)})

    app = Starlette(routes=[Route("/v1/completions", echo, methods=["POST"]),
                            Route("/adapters", echo, methods=["POST"])])
    app.state.lofit = SimpleNamespace(store_loader=loader)
    app.add_middleware(LoadOnMiss, settings=None)
    return app


def test_the_middleware_loads_what_a_request_names_before_it_is_routed(stories_identity, tmp_path):
    from starlette.testclient import TestClient

    store = AdapterStore("memory://lofit-middleware")
    publish_by_hand(store, adapter(stories_identity, "tqa", seed=40))
    for filename, data in broken_objects(stories_identity)["not JSON"].items():
        store.fs.pipe_file(f"{store.root}/bad/{filename}", data)
    loader = replica(stories_identity, store, tmp_path / "c")
    with TestClient(middleware_app(loader)) as client:
        body = json.dumps({"model": "base", "prompt": "x", "vllm_xargs": {"lofit_adapters": ["tqa:0.5"]}})
        answer = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 200 and answer.json() == {"body": body, "loaded": ["tqa"]}  # body replayed
        refused = client.post("/v1/completions", json={"model": "bad", "prompt": "x"})
        assert refused.status_code == 400 and "'bad' in the adapter store is not valid" in refused.json()[
            "error"]["message"]
        assert client.post("/v1/completions", content=b"{not json").json()["body"] == "{not json"
        assert client.post("/adapters", json={"name": "bad"}).status_code == 200  # admin routes: no miss handling
        assert loader.registry.records.keys() == {"tqa"}
    down = replica(stories_identity, AdapterStore("s3://lofit-adapters/x", {
        "endpoint_url": "http://127.0.0.1:9", "config_kwargs": {"retries": {"max_attempts": 1}}}), tmp_path / "d")
    with TestClient(middleware_app(down)) as client:
        unavailable = client.post("/v1/completions", json={"model": "tqa", "prompt": "x"})
        assert unavailable.status_code == 503 and "adapter store cannot be read" in unavailable.text


def test_preloading_from_the_store_loads_the_names_asked_for_and_reports_the_rest(stories_identity, tmp_path):
    from types import SimpleNamespace

    from server.app import preload_from_store

    store = AdapterStore("memory://lofit-preload")
    for i in range(2):
        publish_by_hand(store, adapter(stories_identity, f"p{i}", seed=50 + i))
    for filename, data in broken_objects(stories_identity)["not JSON"].items():
        store.fs.pipe_file(f"{store.root}/bad/{filename}", data)
    for names, loaded, skipped in ((["all"], {"p0", "p1"}, {"bad"}), (["p1", "gone"], {"p1"}, {"gone"})):
        loader = replica(stories_identity, store, tmp_path / str(names))
        state = SimpleNamespace(store_loader=loader, registry=loader.registry, skipped_adapters={},
                                settings=SimpleNamespace(adapter_store_preload=names))
        run(preload_from_store(state))
        assert set(loader.registry.records) == loaded and set(state.skipped_adapters) == skipped


def test_a_missing_bucket_is_an_outage_not_a_removal(stories_identity, s3_url, tmp_path):
    """A store whose bucket is gone (deleted, or a restarted S3 that keeps nothing) must not unload adapters as
    if they had been removed from it."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_url)
    s3.create_bucket(Bucket="lofit-doomed")
    store = AdapterStore("s3://lofit-doomed/x", {"endpoint_url": s3_url})
    publish_by_hand(store, adapter(stories_identity, "kept", seed=70))
    loader = replica(stories_identity, store, tmp_path / "c", ttl=0)
    run(loader.ensure({"kept"}))
    for key in [o["Key"] for o in s3.list_objects_v2(Bucket="lofit-doomed")["Contents"]]:
        s3.delete_object(Bucket="lofit-doomed", Key=key)
    s3.delete_bucket(Bucket="lofit-doomed")
    store.fs.invalidate_cache()
    run(loader.ensure({"kept"}))  # past its TTL: the store cannot say, so the loaded copy stays
    assert "kept" in loader.registry.records
    with pytest.raises(StoreUnavailable, match="bucket does not exist"):
        run(loader.ensure({"new"}))


def test_a_broken_update_or_an_outage_keeps_the_loaded_copy_until_an_explicit_reload(stories_identity, tmp_path):
    store = AdapterStore("memory://lofit-keep")
    good = adapter(stories_identity, "k", seed=80)
    publish_by_hand(store, good)
    loader = replica(stories_identity, store, tmp_path / "c", ttl=0)
    run(loader.ensure({"k"}))
    store.fs.pipe_file(f"{store.root}/k/{CONFIG_FILE}", b"{not json")  # a bad publish over a good adapter
    run(loader.ensure({"k"}))
    assert loader.registry.records["k"].adapter.content_sha256 == good.content_sha256  # still served
    with pytest.raises(InvalidAdapter, match="not valid"):
        run(loader.refresh("k"))  # the explicit reload says what is wrong


def test_the_node_cache_serves_while_the_store_is_down(stories_identity, tmp_path):
    store = AdapterStore("memory://lofit-cached")
    publish_by_hand(store, adapter(stories_identity, "c1", seed=90))
    first = replica(stories_identity, store, tmp_path / "cache")
    run(first.ensure({"c1"}))
    down = AdapterStore("s3://lofit-adapters/x", {"endpoint_url": "http://127.0.0.1:9", "config_kwargs": {
        "retries": {"max_attempts": 1}}})
    replacement = replica(stories_identity, down, tmp_path / "cache")  # the same node cache, the store down
    run(replacement.ensure({"c1"}))
    assert "c1" in replacement.registry.records
    with pytest.raises(StoreUnavailable):
        run(replacement.ensure({"c2"}))

