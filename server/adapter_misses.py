"""Load-on-miss in the API server: adapters a request names that this replica has not loaded come from the store.

vLLM answers an unknown ``model`` through its LoRA resolvers (``vllm/lora/resolver.py``: a plugin turns the name
into an adapter at request time); Ray Serve LLM and LoRAX download an adapter on its first request. Here
:class:`LoadOnMiss`, an ASGI middleware inside the key check, reads a request's JSON body before it is routed,
collects every adapter it names (:func:`server.steering.named_adapters`) and hands them to
:meth:`StoreLoader.ensure`, which for each name:

* not loaded: reads it from the store (:class:`server.adapter_store.AdapterStore`), validates it exactly as a
  local adapter, writes it to this node's cache folder and loads it on every worker — then the request is routed
  as usual (a name the store lacks is the route's usual 404);
* loaded from the store longer ago than the TTL: asks the store for its current content hash (one small read)
  and reloads if it changed, unloads if it is gone (a store that cannot be reached leaves it as it is);
* ``name@<content_sha256>``: loads exactly that content (kept by the store under ``.versions``, or the loaded or
  current content of ``name`` when it is that one), under that reference, never revalidated.

A name the store lacks is not looked up again for 2 s (or the TTL, if shorter), so clients sending a model name
the store does not have cost one read, not one per request. Concurrent misses for one name share one fetch (an
:func:`asyncio.shield`-ed task, so a client that goes away does not cancel it for the others). A broken object is
the request's 400 and nothing is loaded; a store that cannot be read is 503.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lofit.adapter import CONFIG_FILE, TENSORS_FILE, AdapterHashMismatchError
from lofit.vllm.contract import split_reference
from server.adapter_store import AdapterStore, StoreMiss, StoreUnavailable
from server.auth import send_error
from server.registry import (
    FROM_STORE,
    AdapterCapacity,
    AdapterRegistry,
    InvalidAdapter,
    Record,
    UnknownAdapter,
    write_folder,
)
from server.steering import MAX_ADAPTERS, named_adapters

log = logging.getLogger("lofit.server")
ABSENT_TTL_S = 2.0  # a name the store lacked is looked up again after this long (or the TTL, if shorter)
TORN_READ_RETRIES = 3  # a reader that meets a half-updated pair of objects reads again after a short pause
ADMIN_PATHS = ("/adapters", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")
MAX_NAMES = MAX_ADAPTERS + 1  # a request may name its adapters (16) and its model
UNAVAILABLE = ("the adapter store cannot be read now (the server log says why); adapters already loaded are "
               "served, retry later for this one")


class StoreLoader:
    """Adapters from the store, loaded into ``registry`` on a miss (module docstring).

    Args:
        registry: the server's adapter registry.
        store: the shared store, or ``None`` (then only pinned references of loaded adapters resolve).
        cache_dir: this node's folder for the files fetched from the store (one folder per reference).
        ttl: seconds a store-loaded adapter is served before its content hash is checked again.
    """

    def __init__(self, registry: AdapterRegistry, store: AdapterStore | None, cache_dir: Path | None,
                 ttl: float, metrics: Any = None) -> None:
        self.registry, self.store, self.cache_dir, self.ttl = registry, store, cache_dir, ttl
        self.metrics = metrics  # server.metrics.Metrics: loads from the store count in lofit_adapter_loads_total
        self.fetches = 0  # adapters read from the store
        self._inflight: dict[str, asyncio.Future] = {}
        self._absent: dict[str, float] = {}  # names the store lacked, and when: not asked again for a moment

    async def ensure(self, references: Iterable[str]) -> None:
        """Make every adapter in ``references`` that the store (or a loaded adapter) can supply loaded and current.

        Raises:
            InvalidAdapter: an object in the store fails validation (nothing is loaded).
            StoreUnavailable: the store could not be read for an adapter this replica does not have.
        """
        for reference in sorted(set(references) - self.registry.reserved):
            if self._needs_work(reference):
                await self._shared(reference, self._settle)

    async def refresh(self, name: str) -> Record:
        """Read ``name`` from the store now, whatever its age (``POST /adapters/{name}/reload``).

        Raises:
            UnknownAdapter: the store has no such adapter (it is unloaded here if it was loaded).
        """
        record = self.registry.records.get(name)
        if record is not None:
            record.checked_at = float("-inf")
        self._absent.pop(name, None)
        await self._shared(name, self._settle_strictly)
        record = self.registry.records.get(name)
        if record is None:
            raise UnknownAdapter(f"adapter {name!r} is not in the adapter store {self.store.uri}")
        return record

    async def publish(self, name: str, files: dict[str, bytes]) -> tuple[Record, bool]:
        """Write an uploaded adapter through to the store, then cache and load it here.

        Raises:
            InvalidAdapter: the files fail validation (nothing is written).
            StoreUnavailable: the store could not be written (nothing is loaded).
        """
        adapter = self.registry.validate_files(files, name, f"upload {name!r}")
        await asyncio.to_thread(self.store.write, name, files, adapter.content_sha256)
        self._absent.pop(name, None)
        return await self._load(name, files, f"upload {name!r}")

    def _needs_work(self, reference: str) -> bool:
        record = self.registry.records.get(reference)
        if record is None:
            absent = self._absent.get(reference)
            if absent is not None and time.monotonic() - absent < min(self.ttl, ABSENT_TTL_S):
                return False  # clients that send a model name the store lacks do not cost a read each
            return self.store is not None or "@" in reference
        record.last_used = time.monotonic()  # named by a request on its way: not the one to make room
        return self.store is not None and "@" not in reference and (
            time.monotonic() - record.checked_at >= self.ttl)

    async def _shared(self, reference: str, work: Any) -> None:
        task = self._inflight.get(reference)
        if task is None:
            task = asyncio.ensure_future(work(reference))
            self._inflight[reference] = task
            task.add_done_callback(lambda _: self._inflight.pop(reference, None))
        await asyncio.shield(task)

    async def _settle_strictly(self, reference: str) -> None:
        await self._settle(reference, strict=True)

    async def _settle(self, reference: str, strict: bool = False) -> None:
        """Load ``reference`` if missing, or bring a loaded one up to date with the store. ``strict`` (an explicit
        reload): a store that cannot be read, or a broken object, is the caller's error; otherwise a loaded
        adapter keeps being served through both (and the server log says why)."""
        name, sha = split_reference(reference)
        record = self.registry.records.get(reference)
        if sha is not None:
            plain = self.registry.records.get(name)
            if plain is not None and plain.adapter.content_sha256 == sha:  # the loaded content: its own bytes
                await self.registry.load_files(reference, plain.files, plain.source, plain.path)
                return
        if self.store is None:
            return
        if record is not None:  # loaded, past its TTL (from the store, or the adapters directory)
            try:
                current = await asyncio.to_thread(self.store.current_sha, name)
            except StoreUnavailable as exc:
                if strict:
                    raise
                log.warning("adapter %s: the store cannot be read, serving the loaded content (%s)", name, exc)
                record.checked_at = time.monotonic()
                return
            if current == record.adapter.content_sha256 or (current is None and record.source != FROM_STORE):
                record.checked_at = time.monotonic()  # (an adapters-directory adapter the store lacks stays)
                return
            if current is None:
                log.info("adapter %s is no longer in the store: unloaded", name)
                await self.registry.unload(reference)
                return
            try:
                await self._fetch(reference, name, sha)
            except InvalidAdapter as exc:
                if strict:
                    raise
                log.error("adapter %s: the store's new content is not valid, serving the loaded content (%s)",
                          name, exc)
                record.checked_at = time.monotonic()
            return
        await self._fetch(reference, name, sha)

    async def _fetch(self, reference: str, name: str, sha: str | None) -> None:
        self.registry.check_reference(reference)
        for attempt in range(TORN_READ_RETRIES):
            try:
                stored = await asyncio.to_thread(self.store.read, name, sha)
            except StoreUnavailable:
                if not await self._from_cache(reference):
                    raise
                return
            except StoreMiss:
                if reference in self.registry.records:
                    await self.registry.unload(reference)
                if len(self._absent) > 10_000:
                    self._absent.clear()
                self._absent[reference] = time.monotonic()
                return  # the route answers its usual 404
            self._absent.pop(reference, None)
            files = {CONFIG_FILE: stored.config, TENSORS_FILE: stored.tensors}
            try:
                await self._load(reference, files, f"the adapter store's {reference}")
                self.fetches += 1
                self._count("ok")
                log.info("adapter %s loaded from the store", reference)
                return
            except InvalidAdapter as exc:
                torn = isinstance(exc.__cause__, AdapterHashMismatchError)
                if not torn or attempt == TORN_READ_RETRIES - 1:
                    self._count("rejected")
                    raise InvalidAdapter(f"adapter {reference!r} in the adapter store is not valid: {exc}") from exc
                await asyncio.sleep(0.05 * (attempt + 1))

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.adapter_loads.labels("store", outcome).inc()

    async def _from_cache(self, reference: str) -> bool:
        """Load ``reference`` from this node's cache while the store cannot be read (a copy fetched earlier, by
        this replica or the one it replaces); whether it could."""
        folder = self.cache_dir / reference if self.cache_dir is not None else None
        if folder is None or not (folder / CONFIG_FILE).is_file() or reference in self.registry.records:
            return False
        try:
            files = await asyncio.to_thread(self.registry.read_folder, folder, reference)
            await self.registry.load_files(reference, files, FROM_STORE, folder, f"the cached {reference}")
        except InvalidAdapter as exc:
            log.error("adapter %s: the store cannot be read and the cached copy is not valid (%s)", reference, exc)
            return False
        log.warning("adapter %s: the store cannot be read; loaded the copy cached on this node", reference)
        return True

    async def _load(self, reference: str, files: dict[str, bytes], where: str) -> tuple[Record, bool]:
        """Load ``files`` (validated once, by the registry), then keep them in this node's cache folder."""
        path = self.cache_dir / reference if self.cache_dir is not None else None
        loaded = await self.registry.load_files(reference, files, FROM_STORE, path, where)
        if path is not None:
            await asyncio.to_thread(write_folder, path, files)
        return loaded


class LoadOnMiss:
    """Pure ASGI middleware: before a request is routed, the adapters its JSON body names are made available by
    :meth:`StoreLoader.ensure` (runs inside the key check: an unauthorised request never reaches the store)."""

    def __init__(self, app: Any, settings: Any) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        state = getattr(getattr(scope.get("app"), "state", None), "lofit", None)
        loader = getattr(state, "store_loader", None)
        if (scope["type"] != "http" or scope["method"] != "POST" or loader is None
                or scope["path"].startswith(ADMIN_PATHS)):
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        try:
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    break
                chunks.append(message.get("body", b""))
                more = message.get("more_body", False)
        except Exception as exc:  # the body limit: let the route raise it, as without this layer
            await self.app(scope, _raising(exc), send)
            return
        body = b"".join(chunks)
        if loader.store is not None or b"@" in body:
            try:
                names = named_adapters(json.loads(body)) if body else set()
            except (ValueError, RecursionError):
                names = set()  # not JSON: the route refuses it
            try:
                if len(names) <= MAX_NAMES:  # more is refused by every route: no store reads for it
                    await loader.ensure(names)
            except InvalidAdapter as exc:
                await send_error(send, 400, str(exc), "BadRequestError")
                return
            except StoreUnavailable as exc:
                log.error("adapter store: %s", exc)
                await send_error(send, 503, UNAVAILABLE, "ServiceUnavailableError")
                return
            except AdapterCapacity as exc:
                await send_error(send, 503, str(exc), "ServiceUnavailableError")
                return
        await self.app(scope, _replaying(body, receive), send)


def _replaying(body: bytes, receive: Any) -> Any:
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _raising(exc: BaseException) -> Any:
    async def fail() -> dict:
        raise exc

    return fail
