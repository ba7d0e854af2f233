"""The LoFiT adapter format (version 1): a directory other tools can read.

::

    my-adapter/
      adapter.safetensors   heads int64 [K, 2] (layer, head; sorted, unique), offsets float32 [K, head_dim],
                            optional scales float32 [K, head_dim] (stage-1 A; inspection only)
      adapter_config.json   format, format_version, name, task, base_model{...}, content_sha256, ...
      heads.png             layers x heads picture of stage-1 scores, selected heads marked (optional)
      train_report.json     loss curves and timings (optional)

:func:`load_adapter` validates everything and raises a specific :class:`AdapterError` subclass with a
message a user can act on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save

from lofit import __version__
from lofit.heads import BaseModelIdentity

FORMAT = "lofit-adapter"
FORMAT_VERSION = 1
TENSORS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
HEADS_PICTURE = "heads.png"
REPORT_FILE = "train_report.json"
MAX_TENSORS_BYTES = 64 * 1024 * 1024  # an adapter is KBs; refuse anything absurd before reading it
MAX_CONFIG_BYTES = 4 * 1024 * 1024  # a config is a few KBs, even with a full head ranking of a large model


class AdapterError(ValueError):
    """An adapter directory that cannot be used; the message says why and what to do."""


class AdapterFileMissingError(AdapterError):
    """A required file of the adapter directory is absent."""


class AdapterFormatError(AdapterError):
    """Unknown format or version, or a file that is not what it claims to be."""


class AdapterShapeError(AdapterError):
    """A tensor has the wrong shape or dtype."""


class AdapterHeadsError(AdapterError):
    """Duplicate, unsorted or out-of-range heads."""


class AdapterValueError(AdapterError):
    """NaN or Inf in the offsets or scales."""


class AdapterHashMismatchError(AdapterError):
    """The tensors do not match the ``content_sha256`` recorded in the config."""


class BaseModelMismatchError(AdapterError):
    """The adapter was trained on a different base model than the one it is applied to."""


def content_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor (name, dtype, shape, little-endian bytes), in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        header = json.dumps([name, str(tensor.dtype), list(tensor.shape)])
        digest.update(header.encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


@dataclass
class LofitAdapter:
    """Selected heads and their offsets, plus the metadata of ``adapter_config.json``.

    ``heads[i] = (layer, head)`` owns ``offsets[i]``; rows are sorted by (layer, head).
    """

    heads: torch.Tensor
    offsets: torch.Tensor
    base_model: BaseModelIdentity
    name: str
    task: str = "custom"
    scales: torch.Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.heads = torch.as_tensor(self.heads, dtype=torch.int64).reshape(-1, 2)
        self.offsets = torch.as_tensor(self.offsets, dtype=torch.float32)
        order = sorted(range(len(self.heads)), key=lambda i: tuple(self.heads[i].tolist()))
        if order != list(range(len(self.heads))):
            index = torch.tensor(order, dtype=torch.int64)
            self.heads, self.offsets = self.heads[index], self.offsets[index]
            if self.scales is not None:
                self.scales = self.scales[index]
        if self.scales is not None:
            self.scales = torch.as_tensor(self.scales, dtype=torch.float32)
        _validate_tensors(self.tensors(), self.base_model, where=f"adapter {self.name!r}")

    @classmethod
    def random(cls, base_model: BaseModelIdentity, name: str, heads: Any = "all", *, seed: int = 0,
               scale: float = 1.0, task: str = "random") -> LofitAdapter:
        """A deterministic random adapter for tests, benchmarks and the engine's self-test (the one builder).

        ``heads``: a list or ``[n, 2]`` int tensor of ``(layer, head)`` pairs, an ``int`` (that many distinct heads
        drawn by ``torch.randperm`` from the seeded generator), or ``"all"`` (every head, layer-major).
        ``offsets = scale * N(0, 1)`` of shape ``[num_heads, head_dim]``, float32, drawn from
        ``torch.Generator().manual_seed(seed)`` after the heads. Raises ``ValueError`` for more heads than the
        model has, and :class:`AdapterError` for heads outside the model.
        """
        layout = base_model.layout
        gen = torch.Generator().manual_seed(seed)
        if isinstance(heads, str):
            if heads != "all":
                raise ValueError(f"heads must be pairs, a count or 'all', got {heads!r}")
            picked = torch.tensor([(layer, head) for layer in range(layout.num_layers)
                                   for head in range(layout.num_heads)])
        elif isinstance(heads, int):
            total = layout.num_layers * layout.num_heads
            if not 0 < heads <= total:
                raise ValueError(f"cannot pick {heads} heads from a model with {total}")
            flat = torch.randperm(total, generator=gen)[:heads]
            picked = torch.stack([flat // layout.num_heads, flat % layout.num_heads], dim=1)
        else:
            picked = torch.as_tensor(heads, dtype=torch.int64).reshape(-1, 2)
        offsets = scale * torch.randn(len(picked), layout.head_dim, generator=gen)
        return cls(heads=picked, offsets=offsets, base_model=base_model, name=name, task=task)

    @property
    def num_heads(self) -> int:
        """K, the number of selected heads (rows of ``heads``)."""
        return int(self.heads.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        """What ``adapter.safetensors`` holds: ``heads`` int64 ``[K, 2]`` (layer, head), ``offsets`` float32
        ``[K, head_dim]`` and, for a stage-1 record, ``scales``; contiguous copies ready to save or hash."""
        out = {"heads": self.heads.contiguous(), "offsets": self.offsets.contiguous()}
        if self.scales is not None:
            out["scales"] = self.scales.contiguous()
        return out

    @property
    def content_sha256(self) -> str:
        """The adapter's content hash (hex sha256 of its tensors, :func:`content_sha256`): the served identity."""
        return content_sha256(self.tensors())

    def head_list(self) -> list[tuple[int, int]]:
        """The selected heads as ``(layer, head)`` pairs, in stored order."""
        return [(int(layer), int(head)) for layer, head in self.heads.tolist()]

    def dense_offsets(self) -> torch.Tensor:
        """Offsets as a ``[num_layers, num_heads, head_dim]`` table, zero for unselected heads."""
        layout = self.base_model.layout
        table = torch.zeros(layout.num_layers, layout.num_heads, layout.head_dim)
        table[self.heads[:, 0], self.heads[:, 1]] = self.offsets
        return table

    def config_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` object (``docs/adapter-format.md``): format, name, task, base model,
        head map, content hash and metadata."""
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "task": self.task,
            "num_heads": self.num_heads,
            "heads": self.head_list(),
            "base_model": self.base_model.to_dict(),
            "content_sha256": self.content_sha256,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "package_version": __version__,
        }
        for key, value in self.metadata.items():
            config.setdefault(key, value)
        return config

    def files(self) -> dict[str, bytes]:
        """``{file name: bytes}`` of the adapter's two files (``adapter.safetensors``, ``adapter_config.json``),
        as :meth:`save` writes them and :func:`adapter_from_bytes` reads them."""
        return {TENSORS_FILE: save(self.tensors(), metadata={"format": FORMAT}),
                CONFIG_FILE: (json.dumps(self.config_dict(), indent=2) + "\n").encode()}

    def save(self, directory: str | Path, extra_files: dict[str, bytes] | None = None) -> Path:
        """Write the adapter directory atomically (a partly written adapter is never visible)."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            for name, data in {**self.files(), **(extra_files or {})}.items():
                (staging / name).write_bytes(data)
            for path in staging.iterdir():  # mkdtemp and safetensors create owner-only files
                path.chmod(0o644)
            staging.chmod(0o755)
            if directory.exists():
                backup = directory.with_name(f".{directory.name}.old")
                os.replace(directory, backup)
                os.replace(staging, directory)
                _remove_tree(backup)
            else:
                os.replace(staging, directory)
        except BaseException:
            _remove_tree(staging)
            raise
        return directory


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _validate_tensors(tensors: dict[str, torch.Tensor], base: BaseModelIdentity, where: str) -> None:
    heads, offsets = tensors.get("heads"), tensors.get("offsets")
    if heads is None or offsets is None:
        missing = [n for n in ("heads", "offsets") if tensors.get(n) is None]
        raise AdapterFormatError(f"{where}: {TENSORS_FILE} lacks tensor(s) {missing}")
    unknown = sorted(set(tensors) - {"heads", "offsets", "scales"})
    if unknown:
        raise AdapterFormatError(f"{where}: unexpected tensors {unknown} (format v{FORMAT_VERSION} has "
                                 "heads, offsets and optional scales)")
    if heads.dtype != torch.int64 or heads.dim() != 2 or heads.shape[1] != 2:
        raise AdapterShapeError(f"{where}: 'heads' must be int64 [K, 2], got {heads.dtype} "
                                f"{list(heads.shape)}")
    k, head_dim = heads.shape[0], base.head_dim
    if k == 0:
        raise AdapterHeadsError(f"{where}: the adapter selects no heads")
    for name in ("offsets", "scales"):
        tensor = tensors.get(name)
        if tensor is None:
            continue
        if tensor.dtype != torch.float32 or list(tensor.shape) != [k, head_dim]:
            raise AdapterShapeError(
                f"{where}: '{name}' must be float32 [{k}, {head_dim}] (K heads x the base model's "
                f"head_dim), got {tensor.dtype} {list(tensor.shape)}")
        if not torch.isfinite(tensor).all():
            raise AdapterValueError(f"{where}: '{name}' contains NaN or Inf; retrain or fix the adapter")
    layers, heads_in_layer = heads[:, 0], heads[:, 1]
    bad = (layers < 0) | (layers >= base.num_hidden_layers) | (heads_in_layer < 0) | (
        heads_in_layer >= base.num_attention_heads)
    if bad.any():
        first = heads[bad.nonzero()[0, 0]].tolist()
        raise AdapterHeadsError(
            f"{where}: head {tuple(first)} is outside the base model's {base.num_hidden_layers} layers x "
            f"{base.num_attention_heads} heads")
    keys = (layers * base.num_attention_heads + heads_in_layer).tolist()
    if len(set(keys)) != len(keys):
        raise AdapterHeadsError(f"{where}: duplicate (layer, head) rows in 'heads'")
    if keys != sorted(keys):
        raise AdapterHeadsError(f"{where}: 'heads' rows must be sorted by (layer, head)")


def _read_limited(path: Path, limit: int, what: str, missing: str) -> bytes:
    """A file's bytes; its size is checked before it is read."""
    if not path.is_file():
        raise AdapterFileMissingError(missing)
    size = path.stat().st_size
    if size > limit:
        raise AdapterFormatError(f"{path}: {size} bytes is far larger than any {what} (limit {limit}); "
                                 "refusing to read it")
    return path.read_bytes()


def parse_config(data: bytes, where: str) -> dict[str, Any]:
    """The ``adapter_config.json`` object in ``data`` (at most :data:`MAX_CONFIG_BYTES`), with its format,
    version and required keys checked; ``where`` names the file in error messages.

    Raises:
        AdapterFormatError: too large, not JSON, not an object, another format or version, a key missing.
    """
    if len(data) > MAX_CONFIG_BYTES:
        raise AdapterFormatError(f"{where}: {len(data)} bytes is far larger than any adapter config "
                                 f"(limit {MAX_CONFIG_BYTES}); refusing to read it")
    try:
        config = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{where}: not valid JSON ({exc})") from exc
    except RecursionError as exc:
        raise AdapterFormatError(f"{where}: not valid JSON (nested too deeply)") from exc
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{where}: expected a JSON object")
    if config.get("format") != FORMAT:
        raise AdapterFormatError(f"{where}: format is {config.get('format')!r}, expected {FORMAT!r}")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise AdapterFormatError(f"{where}: format_version {version!r} is not supported by this lofit "
                                 f"({__version__}, reads version {FORMAT_VERSION}); upgrade lofit")
    for key in ("name", "base_model", "content_sha256"):
        if key not in config:
            raise AdapterFormatError(f"{where}: required key {key!r} is missing")
    return config


def parse_tensors(data: bytes, where: str) -> dict[str, torch.Tensor]:
    """The tensors of an ``adapter.safetensors`` file's bytes (at most :data:`MAX_TENSORS_BYTES`).

    Raises:
        AdapterFormatError: too large, or not a readable safetensors file.
    """
    if len(data) > MAX_TENSORS_BYTES:
        raise AdapterFormatError(f"{where}: {len(data)} bytes is far larger than any LoFiT adapter "
                                 f"(limit {MAX_TENSORS_BYTES}); refusing to read it")
    try:
        return load_safetensors(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFormatError(f"{where}: not a readable safetensors file ({exc})") from exc


def load_adapter(directory: str | Path, expect_base: BaseModelIdentity | None = None) -> LofitAdapter:
    """Read and fully validate an adapter directory.

    With ``expect_base``, also check that the adapter belongs to that base model (architecture, sizes
    and weight fingerprint); this is the check users hit when pointing an adapter at the wrong model.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFileMissingError(f"{directory}: adapter directory not found")
    config = _read_limited(directory / CONFIG_FILE, MAX_CONFIG_BYTES, "adapter config",
                           f"{directory}: {CONFIG_FILE} not found; is this a LoFiT adapter directory (made by "
                           "lofit-train)?")
    tensors = _read_limited(directory / TENSORS_FILE, MAX_TENSORS_BYTES, "LoFiT adapter",
                            f"{directory}: {TENSORS_FILE} not found")
    return adapter_from_bytes(config, tensors, expect_base, where=str(directory))


def adapter_from_bytes(config_bytes: bytes, tensors_bytes: bytes, expect_base: BaseModelIdentity | None = None,
                       where: str = "adapter") -> LofitAdapter:
    """Validate an adapter given as the bytes of its two files (``adapter_config.json``, ``adapter.safetensors``)
    exactly as :func:`load_adapter` validates a directory: how adapters travel to workers on other nodes and come
    from object stores. ``where`` names the source in error messages.

    Raises:
        AdapterError: the subclass :func:`load_adapter` raises for the same fault.
    """
    config = parse_config(config_bytes, f"{where}/{CONFIG_FILE}")
    try:
        base = BaseModelIdentity.from_dict(config["base_model"])
    except (KeyError, TypeError, AttributeError) as exc:
        raise AdapterFormatError(f"{where}/{CONFIG_FILE}: invalid base_model ({exc})") from exc
    tensors = parse_tensors(tensors_bytes, f"{where}/{TENSORS_FILE}")
    where = f"adapter {config['name']!r} at {where}"
    _validate_tensors(tensors, base, where)
    actual = content_sha256(tensors)
    if actual != config["content_sha256"]:
        raise AdapterHashMismatchError(
            f"{where}: tensors hash to {actual[:16]}…, config records {str(config['content_sha256'])[:16]}…; "
            "the files were modified or mixed from two adapters")
    if expect_base is not None:
        problems = base.mismatches(expect_base)
        if problems:
            same_name = ", same name, other weights or shape" if base.name_or_path == expect_base.name_or_path else ""
            raise BaseModelMismatchError(
                f"{where} was trained on {base.name_or_path!r}, which differs from the model in use "
                f"({expect_base.name_or_path!r}{same_name}): " + "; ".join(problems)
                + ". Train an adapter for this model with lofit-train, or load the adapter's base model.")
    known = {"format", "format_version", "name", "task", "num_heads", "heads", "base_model",
             "content_sha256", "package_version"}
    metadata = {k: v for k, v in config.items() if k not in known}
    adapter = LofitAdapter(heads=tensors["heads"], offsets=tensors["offsets"], scales=tensors.get("scales"),
                           base_model=base, name=str(config["name"]), task=str(config.get("task", "custom")),
                           metadata=metadata)
    return adapter
