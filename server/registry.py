"""The server's view of the adapters: which names are loaded, their metadata, and loading them safely.

Adapters live in folders under the adapters directory (one folder per adapter, folder name = adapter name), or in
a shared store (:mod:`server.adapter_store`, loaded on a miss by :mod:`server.adapter_misses`). Either way the
files are read and validated here, and their bytes — never a path, which may exist only on this node — go to
every worker through the engine (``collective_rpc`` ``lofit_load_bytes``), which validates them again against the
served model; a name's lock keeps concurrent loads and unloads of one name in order. With a store, the registry is
a cache: at ``--max-adapters`` the least recently used adapter that came from the store makes room. Names are checked
against a strict pattern (the whole name, ASCII only) and may not be one of the served model's names;
resolved paths must stay inside the adapters directory, and symbolic links are refused (an adapter folder
that is a link, or an adapter file that is one), so neither a name nor a link can make the server read a
file outside the directory.

The registry keeps vLLM's model list (``OpenAIServingModels.lora_requests``: what ``GET /v1/models`` lists and
what vLLM's routes accept as ``model``) in step with the loaded adapters. An unload first stops new requests
from resolving the name, waits until requests that did have been handed to the engine
(:class:`server.engine_client.Admissions`), then unloads on the workers: every request the API server accepted
is steered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lofit.adapter import (
    CONFIG_FILE,
    MAX_CONFIG_BYTES,
    MAX_TENSORS_BYTES,
    TENSORS_FILE,
    AdapterError,
    LofitAdapter,
    adapter_from_bytes,
)
from lofit.heads import BaseModelIdentity
from lofit.vllm.contract import RPC_LOAD_BYTES, RPC_UNLOAD, Combination, split_reference
from server.schemas import AdapterInfo
from server.steering import ADAPTER_NAME, ADAPTER_REFERENCE, Steering

_NAME, _REFERENCE = re.compile(ADAPTER_NAME), re.compile(ADAPTER_REFERENCE)
_SWAP = threading.Lock()
RECENT_S = 2.0  # an adapter named this recently is not unloaded to make room
FROM_DIR, FROM_STORE = "adapters-dir", "store"  # where a record's files came from
_STAGING = re.compile(r"\.upload-[A-Za-z0-9._-]+?\.[A-Za-z0-9_]{8}/")  # tempfile.mkdtemp(prefix=".upload-<name>.")


class UnknownAdapter(KeyError):
    """A request named an adapter that is not loaded."""


class AdapterCapacity(RuntimeError):
    """Every adapter slot holds an adapter in use: a load must wait (HTTP 503)."""


class InvalidAdapter(ValueError):
    """An adapter that cannot be loaded: a bad name, a missing folder, or a file that fails validation."""


class NotRegularFile(Exception):
    """:func:`read_regular_file` refused ``path``: ``reason`` is ``LINK``, ``MISSING`` (absent, or not a regular
    file) or ``LARGE`` (``size`` bytes, over the limit)."""

    LINK, MISSING, LARGE = "link", "missing", "large"

    def __init__(self, reason: str, size: int = 0) -> None:
        super().__init__(reason)
        self.reason, self.size = reason, size


def read_regular_file(path: Path, limit: int) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes. The file is opened without
    following a symbolic link (``O_NOFOLLOW``) or blocking on a FIFO (``O_NONBLOCK``), and checked on the open
    descriptor, so it cannot be swapped between the check and the read.

    Raises :class:`NotRegularFile`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise NotRegularFile(NotRegularFile.MISSING) from None
    except OSError:  # ELOOP: the last component is a link (or another refusal to open it)
        raise NotRegularFile(NotRegularFile.LINK if os.path.islink(path) else NotRegularFile.MISSING) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
        os.close(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(NotRegularFile.MISSING)
        raise NotRegularFile(NotRegularFile.LARGE, info.st_size)
    with os.fdopen(fd, "rb") as handle:
        return handle.read(limit + 1)[:limit]


@dataclass
class Record:
    adapter: LofitAdapter
    path: Path | None  # the folder its files are in on this node (adapters dir, or the store's cache)
    loaded_at: str
    files: dict[str, bytes] = field(default_factory=dict, repr=False)  # what the workers loaded
    source: str = FROM_DIR
    checked_at: float = field(default_factory=time.monotonic)  # last time the store said it is current
    last_used: float = field(default_factory=time.monotonic)
    requests_served: int = 0

    def info(self) -> AdapterInfo:
        a = self.adapter
        return AdapterInfo(
            name=a.name, task=a.task, base_model=a.base_model.name_or_path, num_heads=a.num_heads,
            heads=[tuple(h) for h in a.heads.tolist()], content_sha256=a.content_sha256,
            fingerprint=Combination.of({a.name: (a.content_sha256, 1.0)}).fingerprint,
            metrics=a.metadata.get("metrics") or {}, created_at=a.metadata.get("created_at"),
            loaded_at=self.loaded_at, source=self.source,
            requests_served=self.requests_served)


@dataclass
class AdapterRegistry:
    """Loaded adapters by name, kept in step with the engine's workers."""

    directory: Path
    base: BaseModelIdentity
    engine: Any  # SteeredAsyncLLM (anything with ``async collective_rpc`` and ``admissions``)
    max_adapters: int = 256
    reserved: frozenset[str] = frozenset()  # the served model's names: never adapter names
    served: dict[str, Any] = field(default_factory=dict)  # vLLM's OpenAIServingModels.lora_requests
    on_unload: Any = None  # called with the name after an unload (metrics retire its series)
    records: dict[str, Record] = field(default_factory=dict)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    def check_name(self, name: str) -> None:
        """Refuse a name that is not a plain adapter name (the whole string must match the pattern), or that
        is one of the served model's names (``model`` could not tell them apart)."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidAdapter(f"invalid adapter name {name!r}: use letters, digits, '.', '_' or '-' "
                                 "(at most 64, starting with a letter or digit)")
        if name in self.reserved:
            raise InvalidAdapter(f"invalid adapter name {name!r}: it is the served model's name, which means "
                                 "'no adapter' in requests; choose another name")

    def check_reference(self, reference: str) -> None:
        """Like :meth:`check_name`, for an adapter name or a pinned reference ``name@<content_sha256>``."""
        if isinstance(reference, str) and _REFERENCE.fullmatch(reference) and "@" in reference:
            self.check_name(split_reference(reference)[0])
        else:
            self.check_name(reference)

    def path_for(self, name: str) -> Path:
        """The folder of adapter ``name`` inside the adapters directory (refuses links and anything that
        leaves it)."""
        self.check_name(name)
        root = self.directory.resolve()
        if (root / name).is_symlink():
            raise InvalidAdapter(f"adapter {name!r} is a symbolic link in the adapters directory; the server "
                                 "refuses links (copy the adapter folder in instead)")
        path = (root / name).resolve()
        if path.parent != root:
            raise InvalidAdapter(f"adapter {name!r} resolves outside the adapters directory")
        return path

    def without_paths(self, message: str) -> str:
        """``message`` with the adapters directory's own path removed (``/srv/adapters/x/f`` -> ``x/f``): clients
        learn which adapter file failed, not where the server keeps it."""
        for root in {str(self.directory.resolve()), str(self.directory)}:
            message = message.replace(root + "/", "").replace(root, "the adapters directory")
        return _STAGING.sub("", message)  # an upload's staging folder (api_adapters) means nothing to clients

    def names_on_disk(self) -> list[str]:
        """Entries that look like adapters, so that start-up loads them or reports why not: folders with an
        ``adapter_config.json``, and links and badly named folders too (hidden ones are the server's own
        staging and backup folders)."""
        if not self.directory.is_dir():
            return []
        return sorted(p.name for p in self.directory.iterdir() if not p.name.startswith(".") and (
            p.is_symlink() or (p / CONFIG_FILE).is_symlink() or (p / CONFIG_FILE).is_file()))

    async def load(self, name: str) -> tuple[Record, bool]:
        """Load (or reload) ``name`` from the adapters directory; returns the record and whether it changed.

        Raises :class:`InvalidAdapter` for a bad name or folder, a file that fails validation, or the adapter
        limit."""
        path = self.path_for(name)
        if not path.is_dir():
            raise InvalidAdapter(f"no adapter folder {name!r} in the adapters directory")
        return await self.load_files(name, self.read_folder(path, name), FROM_DIR, path)

    def read_folder(self, path: Path, name: str) -> dict[str, bytes]:
        """The bytes of the adapter files in ``path`` (:func:`read_regular_file`: no links, sizes checked)."""
        files = {}
        for filename, limit in ((CONFIG_FILE, MAX_CONFIG_BYTES), (TENSORS_FILE, MAX_TENSORS_BYTES)):
            try:
                files[filename] = read_regular_file(path / filename, limit)
            except NotRegularFile as exc:
                if exc.reason == NotRegularFile.LINK:
                    raise InvalidAdapter(f"adapter {name!r}: {filename} is a symbolic link; the server only reads "
                                         "regular files inside the adapters directory") from None
                if exc.reason == NotRegularFile.MISSING:
                    raise InvalidAdapter(f"adapter {name!r}: {filename} not found; is this a LoFiT adapter folder "
                                         "(made by lofit-train)?") from None
                raise InvalidAdapter(f"adapter {name!r}: {filename} is {exc.size} bytes, far larger than any LoFiT "
                                     f"adapter file (limit {limit}); refusing to read it") from None
        return files

    def validate_files(self, files: dict[str, bytes], reference: str, where: str) -> LofitAdapter:
        """The adapter in ``files``, checked against the served model and required to be ``reference``: named
        so, and with ``name@<sha>`` holding exactly that content."""
        name, sha = split_reference(reference)
        try:
            adapter = adapter_from_bytes(files[CONFIG_FILE], files[TENSORS_FILE], expect_base=self.base,
                                         where=where)
        except AdapterError as exc:
            raise InvalidAdapter(self.without_paths(str(exc))) from exc
        if adapter.name != name:
            raise InvalidAdapter(f"adapter {name!r}: the files hold an adapter named {adapter.name!r}; "
                                 "the folder name must equal the adapter's name")
        if sha is not None and adapter.content_sha256 != sha:
            raise InvalidAdapter(f"adapter {reference!r}: no such content of {name!r} (it now holds "
                                 f"{adapter.content_sha256[:16]}…)")
        return adapter

    async def load_files(self, reference: str, files: dict[str, bytes], source: str, path: Path | None,
                         where: str | None = None) -> tuple[Record, bool]:
        """Validate ``files`` and make them resident as ``reference`` on every worker (their bytes travel with
        the call); returns the record and whether the content changed. At the adapter limit, the least recently
        used adapter from the store is unloaded first; without one, :class:`InvalidAdapter`."""
        adapter = self.validate_files(files, reference, where or f"adapter {reference!r}")
        async with self._lock(reference):
            current = self.records.get(reference)
            if current is not None and current.adapter.content_sha256 == adapter.content_sha256:
                current.checked_at = time.monotonic()
                return current, False
            if current is None and len(self.records) >= self.max_adapters:
                victim = self.least_recently_used(exclude=reference)
                if victim is None and any(r.source == FROM_STORE for r in self.records.values()):
                    raise AdapterCapacity(f"all {self.max_adapters} adapter slots (--max-adapters) hold adapters "
                                          f"used in the last {RECENT_S:g} s; retry, or raise --max-adapters")
                if victim is None:
                    raise InvalidAdapter(f"{self.max_adapters} adapters are loaded, the server's limit "
                                         "(--max-adapters); unload one first")
                await self.unload(victim)
            await self.engine.collective_rpc(RPC_LOAD_BYTES, args=(reference, files[CONFIG_FILE],
                                                                   files[TENSORS_FILE]))
            record = Record(adapter if reference == adapter.name else dataclasses.replace(adapter, name=reference),
                            path, datetime.now(UTC).isoformat(timespec="seconds"), files=files, source=source)
            self.records[reference] = record
            self.served[reference] = Steering.of(reference, {reference: 1.0}, root=reference)
            return record, True

    def least_recently_used(self, exclude: str) -> str | None:
        """The loaded adapter from the store used longest ago, and not in the last :data:`RECENT_S` seconds (a
        request that named it may be on its way to the engine); ``None``: none can make room."""
        recent = time.monotonic() - RECENT_S
        candidates = [(r.last_used, n) for n, r in self.records.items()
                      if r.source == FROM_STORE and n != exclude and r.last_used < recent]
        return min(candidates)[1] if candidates else None

    async def install(self, name: str, files: dict[str, bytes]) -> Path:
        """Validate ``files`` and write them atomically into the adapters directory as folder ``name`` (replacing
        an older folder; with the directory's permissions); the caller then loads it."""
        target = self.path_for(name)
        self.validate_files(files, name, f"adapter {name!r}")
        self.directory.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(write_folder, target, files, stat.S_IMODE(self.directory.stat().st_mode))
        return target

    async def unload(self, name: str) -> bool:
        """Forget ``name``; returns False when it was not loaded. Running requests finish with its content."""
        self.check_reference(name)
        async with self._lock(name):
            record = self.records.pop(name, None)
            if record is None:
                return False
            self.served.pop(name, None)
            try:
                admissions = getattr(self.engine, "admissions", None)
                if admissions is not None:
                    await admissions.wait_released(name)
                await self.engine.collective_rpc(RPC_UNLOAD, args=(name,))
            except BaseException:
                self.records[name] = record
                self.served[name] = Steering.of(name, {name: 1.0}, root=name)
                raise
            if self.on_unload is not None:
                self.on_unload(name)
            return True

    def resolve(self, weights: dict[str, float]) -> Combination:
        """The combination a request asks for; raises :class:`UnknownAdapter` for names not loaded."""
        unknown = sorted(set(weights) - set(self.records))
        if unknown:
            raise UnknownAdapter(f"adapter(s) not loaded: {', '.join(unknown)}; loaded: "
                                 f"{', '.join(sorted(self.records)) or 'none'}")
        return Combination.of({n: (self.records[n].adapter.content_sha256, w) for n, w in weights.items()})

    def count(self, weights: dict[str, float]) -> None:
        now = time.monotonic()
        for name in weights:
            if name in self.records:
                self.records[name].requests_served += 1
                self.records[name].last_used = now

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())


def write_folder(target: Path, files: dict[str, bytes], mode: int = 0o755) -> None:
    """Write ``files`` as folder ``target`` atomically: a staging folder beside it is renamed into place (an older
    folder is swapped out first), so readers see the old folder or the new one, never a mix."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".upload-{target.name}.", dir=target.parent))
    try:
        for filename, data in files.items():
            (staging / filename).write_bytes(data)
            os.chmod(staging / filename, mode & 0o666)
        os.chmod(staging, mode)
        old = target.with_name(f".old-{target.name}")
        with _SWAP:  # two writers of one folder (an upload and a fetch) take turns
            if target.exists():
                shutil.rmtree(old, ignore_errors=True)
                target.rename(old)
            staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def now_ms() -> float:
    return time.perf_counter() * 1000
