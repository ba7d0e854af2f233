"""The server's view of the adapters: which names are loaded, their metadata, and loading them safely.

Adapters live in folders under the adapters directory (one folder per adapter, folder name = adapter name).
Loading goes through the engine (``collective_rpc``), which validates the adapter against the served model
on every worker; a name's lock keeps concurrent loads and unloads of one name in order. Names are checked
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
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lofit.adapter import CONFIG_FILE, TENSORS_FILE, AdapterError, LofitAdapter, load_adapter
from lofit.heads import BaseModelIdentity
from lofit.vllm.contract import RPC_LOAD, RPC_UNLOAD, Combination
from server.schemas import AdapterInfo
from server.steering import ADAPTER_NAME, Steering

_NAME = re.compile(ADAPTER_NAME)
_STAGING = re.compile(r"\.upload-[A-Za-z0-9._-]+?\.[A-Za-z0-9_]{8}/")  # tempfile.mkdtemp(prefix=".upload-<name>.")


class UnknownAdapter(KeyError):
    """A request named an adapter that is not loaded."""


class InvalidAdapter(ValueError):
    """An adapter that cannot be loaded: a bad name, a missing folder, or a file that fails validation."""


@dataclass
class Record:
    adapter: LofitAdapter
    path: Path
    loaded_at: str
    requests_served: int = 0

    def info(self) -> AdapterInfo:
        a = self.adapter
        return AdapterInfo(
            name=a.name, task=a.task, base_model=a.base_model.name_or_path, num_heads=a.num_heads,
            heads=[tuple(h) for h in a.heads.tolist()], content_sha256=a.content_sha256,
            fingerprint=Combination.of({a.name: (a.content_sha256, 1.0)}).fingerprint,
            metrics=a.metadata.get("metrics") or {}, created_at=a.metadata.get("created_at"),
            loaded_at=self.loaded_at,
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

        The record keeps the content hash the workers report (what requests are steered with), not only the one
        read here first. Raises :class:`InvalidAdapter` for a bad name or folder, a file that fails validation,
        the adapter limit, or files that changed while loading."""
        path = self.path_for(name)
        if not path.is_dir():
            raise InvalidAdapter(f"no adapter folder {name!r} in the adapters directory")
        adapter = self.validate(path, name)
        async with self._lock(name):
            current = self.records.get(name)
            if current is not None and current.adapter.content_sha256 == adapter.content_sha256:
                return current, False
            if current is None and len(self.records) >= self.max_adapters:
                raise InvalidAdapter(f"{self.max_adapters} adapters are loaded, the server's limit "
                                     "(--max-adapters); unload one first")
            served = (await self.engine.collective_rpc(RPC_LOAD, args=(str(path),)))[0]["content_sha256"]
            if served != adapter.content_sha256:  # the folder changed between our read and the workers'
                adapter = self.validate(path, name)
                if adapter.content_sha256 != served:
                    self.records.pop(name, None)
                    self.served.pop(name, None)
                    raise InvalidAdapter(f"adapter {name!r} changed on disk while it was being loaded; "
                                         "load it again once its files are complete")
            record = Record(adapter, path, datetime.now(UTC).isoformat(timespec="seconds"))
            self.records[name] = record
            self.served[name] = Steering.of(name, {name: 1.0}, root=name)
            return record, True

    def validate(self, path: Path, name: str) -> LofitAdapter:
        """The adapter in ``path``, checked against the served model and required to be named ``name``."""
        for filename in (CONFIG_FILE, TENSORS_FILE):
            if (path / filename).is_symlink():
                raise InvalidAdapter(f"adapter {name!r}: {filename} is a symbolic link; the server only reads "
                                     "regular files inside the adapters directory")
        try:
            adapter = load_adapter(path, expect_base=self.base)
        except AdapterError as exc:
            raise InvalidAdapter(self.without_paths(str(exc))) from exc
        if adapter.name != name:
            raise InvalidAdapter(f"adapter {name!r}: the files hold an adapter named {adapter.name!r}; "
                                 "the folder name must equal the adapter's name")
        return adapter

    async def install(self, name: str, staging: Path) -> None:
        """Validate the adapter files in ``staging`` and move them into place as folder ``name`` (replacing an
        older folder); the caller then loads it with :meth:`load`."""
        target = self.path_for(name)
        self.validate(staging, name)
        mode = stat.S_IMODE(self.directory.stat().st_mode)  # as the rest of the adapters folder
        os.chmod(staging, mode)
        for file in staging.iterdir():
            os.chmod(file, mode & 0o666)
        async with self._lock(name):
            old = target.with_name(f".old-{name}")
            if target.exists():
                shutil.rmtree(old, ignore_errors=True)
                target.rename(old)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)

    async def unload(self, name: str) -> bool:
        """Forget ``name``; returns False when it was not loaded. Running requests finish with its content."""
        self.check_name(name)
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
        for name in weights:
            if name in self.records:
                self.records[name].requests_served += 1

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())


def now_ms() -> float:
    return time.perf_counter() * 1000
