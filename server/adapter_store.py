"""The shared adapter store of the API server: adapters kept in object storage (or any fsspec file system), which
every replica reads on a miss and uploads write through to (``lofit-serve --adapter-store URI``).

Layout under the store's URI (a plain adapter folder per name, so ``aws s3 cp -r adapters/x s3://bucket/x``
publishes one, as vLLM's ``lora_filesystem_resolver`` expects ``{dir}/{name}/``)::

    <uri>/<name>/adapter_config.json             the current content of adapter <name>
    <uri>/<name>/adapter.safetensors
    <uri>/.versions/<name>/<content_sha256>/...  every content uploaded through lofit-serve, never rewritten:
                                                 what ``<name>@<content_sha256>`` serves

Storage is fsspec's (``file://``, ``memory://``, ``s3://`` with ``s3fs``, ``gs://`` with ``gcsfs``, ...;
credentials and endpoints as each backend reads them, e.g. ``AWS_ACCESS_KEY_ID`` and ``AWS_ENDPOINT_URL_S3``,
or ``--adapter-store-options`` as JSON). Each object write is atomic (object stores; on a local disk a
temporary file is renamed into place). A writer puts the tensors before the config, and a reader that meets a
half-updated pair sees a content-hash mismatch and reads again (:meth:`AdapterStore.read` leaves that to the
caller, which validates). Reads are bounded (:data:`lofit.adapter.MAX_CONFIG_BYTES` /
:data:`~lofit.adapter.MAX_TENSORS_BYTES` + 1 bytes are requested, so an oversized object is refused without
being downloaded whole).

fsspec calls block; the API server runs them in threads (:func:`asyncio.to_thread`).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec

from lofit.adapter import CONFIG_FILE, MAX_CONFIG_BYTES, MAX_TENSORS_BYTES, TENSORS_FILE

VERSIONS = ".versions"
FILES = (TENSORS_FILE, CONFIG_FILE)  # in write order: a reader never sees a new config before its tensors


class StoreMiss(LookupError):
    """The store has no such adapter (or no such content of it)."""


class StoreUnavailable(OSError):
    """The store could not be read or written (network, permissions, a missing bucket)."""


@dataclass(frozen=True)
class StoredAdapter:
    """An adapter's two files as read from the store; ``where`` names the objects (without credentials)."""

    config: bytes
    tensors: bytes
    where: str


class AdapterStore:
    """An fsspec location holding adapters (see the module docstring for the layout).

    Args:
        uri: an fsspec URL (``s3://bucket/prefix``, ``file:///srv/adapters``, ``memory://name``).
        storage_options: keyword arguments for the backend (``{"endpoint_url": ...}`` for S3, ...).

    Raises:
        ValueError: an unknown protocol, or one whose package is not installed (the message names it).
    """

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        try:
            self.fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        except (ImportError, ValueError) as exc:
            raise ValueError(f"adapter store {uri!r}: {exc}") from None
        self.uri = uri.rstrip("/")
        self.root = root.rstrip("/")
        self.local = "file" in _protocols(self.fs)

    def _path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def where(self, name: str, sha: str | None = None) -> str:
        """The store URL of adapter ``name`` (or of its content ``sha``)."""
        return "/".join((self.uri, VERSIONS, name, sha) if sha else (self.uri, name))

    def read(self, name: str, sha: str | None = None) -> StoredAdapter:
        """The files of adapter ``name``: its current content, or with ``sha`` the content kept under that hash
        (falling back to the current content, which the caller checks against ``sha``).

        Raises:
            StoreMiss: no such adapter (or content).
            StoreUnavailable: the store could not be read.
        """
        if sha is None:
            return self._read_files((name,), self.where(name))
        try:
            return self._read_files((VERSIONS, name, sha), self.where(name, sha))
        except StoreMiss:
            pass  # published by hand (no versions): the current content may still be that one
        current = self._read_files((name,), self.where(name))
        try:
            recorded = json.loads(current.config).get("content_sha256")
        except (ValueError, AttributeError):
            recorded = None
        if recorded != sha:
            raise StoreMiss(self.where(name, sha))
        return current

    def current_sha(self, name: str) -> str | None:
        """The ``content_sha256`` the current config of ``name`` records (``None``: not in the store); one small
        read, how replicas check that what they loaded is still current.

        Raises:
            StoreUnavailable: the store could not be read.
        """
        try:
            data = self._cat(self._path(name, CONFIG_FILE), MAX_CONFIG_BYTES)
        except StoreMiss:
            return None
        try:
            sha = json.loads(data).get("content_sha256")
        except (ValueError, AttributeError):
            return ""  # not readable: differs from anything loaded, so the caller fetches and reports it
        return sha if isinstance(sha, str) else ""

    def write(self, name: str, files: dict[str, bytes], sha: str) -> None:
        """Publish validated files as adapter ``name``: first under ``.versions/<name>/<sha>`` (kept forever), then
        as its current content, tensors before config.

        Raises:
            StoreUnavailable: the store could not be written.
        """
        try:
            if not self.fs.exists(self._path(VERSIONS, name, sha, CONFIG_FILE)):
                for filename in FILES:
                    self._put(self._path(VERSIONS, name, sha, filename), files[filename])
            for filename in FILES:
                self._put(self._path(name, filename), files[filename])
        except Exception as exc:  # backends raise their own errors (botocore, aiohttp, ...)
            raise StoreUnavailable(f"cannot write adapter {name!r} to {self.uri}: {_reason(exc)}") from exc

    def delete(self, name: str) -> bool:
        """Remove the current content of ``name`` (its ``.versions`` stay, so pinned references keep working);
        returns whether it was there.

        Raises:
            StoreUnavailable: the store could not be written.
        """
        try:
            if not self.fs.exists(self._path(name, CONFIG_FILE)):
                return False
            for filename in (CONFIG_FILE, TENSORS_FILE):  # config first: the name stops resolving at once
                if self.fs.exists(self._path(name, filename)):
                    self.fs.rm_file(self._path(name, filename))
            return True
        except Exception as exc:  # backends raise their own errors (botocore, aiohttp, ...)
            raise StoreUnavailable(f"cannot delete adapter {name!r} from {self.uri}: {_reason(exc)}") from exc

    def names(self) -> list[str]:
        """The adapter names with a current content in the store (one listing plus one check per entry).

        Raises:
            StoreUnavailable: the store could not be read.
        """
        try:
            entries = self.fs.ls(self.root, detail=False) if self.fs.exists(self.root) else []
            names = [str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries]
            return sorted(n for n in names if not n.startswith(".")
                          and self.fs.exists(self._path(n, CONFIG_FILE)))
        except Exception as exc:  # backends raise their own errors (botocore, aiohttp, ...)
            raise StoreUnavailable(f"cannot list {self.uri}: {_reason(exc)}") from exc

    def _read_files(self, parts: tuple[str, ...], where: str) -> StoredAdapter:
        config = self._cat(self._path(*parts, CONFIG_FILE), MAX_CONFIG_BYTES)
        tensors = self._cat(self._path(*parts, TENSORS_FILE), MAX_TENSORS_BYTES)
        return StoredAdapter(config, tensors, where)

    def _cat(self, path: str, limit: int) -> bytes:
        """At most ``limit + 1`` bytes of ``path`` (one ranged read: more than ``limit`` means too large). A missing
        object is :class:`StoreMiss` only while the store itself is there: a missing bucket (or root folder) is
        :class:`StoreUnavailable`, so an outage or a misconfiguration never reads as "every adapter was removed"."""
        try:
            return self.fs.cat_file(path, start=0, end=limit + 1)
        except (FileNotFoundError, IsADirectoryError):
            self.check()
            raise StoreMiss(path) from None
        except Exception as exc:  # backends raise their own errors (botocore, aiohttp, ...)
            raise StoreUnavailable(f"cannot read {self.uri}: {_reason(exc)}") from exc

    def prepare(self) -> None:
        """At server start: create the root folder of a ``file://`` or ``memory://`` store, then :meth:`check`."""
        if self.local or "memory" in _protocols(self.fs):
            try:
                self.fs.makedirs(self.root, exist_ok=True)
            except OSError as exc:
                raise StoreUnavailable(f"cannot create {self.uri}: {_reason(exc)}") from exc
        self.check()

    def check(self) -> None:
        """Raise :class:`StoreUnavailable` unless the store's root can be seen: its folder, or on an object store
        its bucket (a prefix with no objects yet is an empty store, not a missing one)."""
        folder = self.local or "memory" in _protocols(self.fs)
        root = self.root if folder else self.root.lstrip("/").split("/", 1)[0]
        try:
            visible = bool(root) and self.fs.exists(root)
        except Exception as exc:  # backends raise their own errors
            raise StoreUnavailable(f"cannot read {self.uri}: {_reason(exc)}") from exc
        if not visible:
            raise StoreUnavailable(f"{self.uri}: its {'folder' if folder else 'bucket'} does not exist")

    def _put(self, path: str, data: bytes) -> None:
        if not self.local:
            self.fs.pipe_file(path, data)  # one PUT: atomic on object stores
            return
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        staging = f"{parent}/.{uuid.uuid4().hex}.tmp"
        self.fs.pipe_file(staging, data)
        self.fs.mv(staging, path)  # a rename on the same disk: atomic


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return tuple(protocol) if isinstance(protocol, tuple | list) else (protocol,)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
