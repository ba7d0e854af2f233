"""A corpus of malformed adapters, bad adapter names and symbolic links, for the server's hardening tests.

Every malformed adapter differs from a good one in exactly one way (its content hash is re-recorded, so the
intended defect is what validation meets) and names the problem its rejection must state. The same corpus
is placed in the adapters folder before start-up (``boot-*``), written into it while the server runs and
loaded by name (``dir-*``), and uploaded (``up-*``).
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from lofit.adapter import CONFIG_FILE, MAX_TENSORS_BYTES, TENSORS_FILE, content_sha256
from tests.server.conftest import random_adapter

Files = dict[str, bytes | int]  # file name -> content, or the size of a sparse file of zeros
SECRET = "TOP-SECRET-5d1c"  # recorded in the adapters outside the adapters folder; no response may show it
PICKLE_MARKER = Path(tempfile.gettempdir()) / "lofit-corpus-pickle-ran"  # made by the payload if it is unpickled


def adapter_files(name: str, *, tensors: dict[str, torch.Tensor | None] | None = None,
                  config: dict | None = None, rehash: bool = True) -> Files:
    """A good adapter ``name`` (4 heads) with tensors replaced (``None`` drops one) and config keys changed."""
    good = random_adapter(name, seed=11)
    values = good.tensors()
    for key, value in (tensors or {}).items():
        if value is None:
            values.pop(key)
        else:
            values[key] = value
    cfg = good.config_dict()
    if rehash:
        cfg["content_sha256"] = content_sha256(values)
    cfg.update(config or {})
    return {CONFIG_FILE: json.dumps(cfg).encode(), TENSORS_FILE: safetensors_bytes(values)}


def _base(**changes: object) -> dict:
    return {**random_adapter("x", seed=0).base_model.to_dict(), **changes}


def _offsets(value: float) -> torch.Tensor:
    offsets = torch.zeros(4, 64)
    offsets[2, 5] = value
    return offsets


def _heads(*rows: tuple[int, int]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64)


def _truncated(name: str) -> Files:
    files = adapter_files(name)
    data = files[TENSORS_FILE]
    return {**files, TENSORS_FILE: data[: len(data) // 2]}


def _huge_header(name: str) -> Files:
    """A safetensors header that claims to be 1 TiB long."""
    return {**adapter_files(name), TENSORS_FILE: struct.pack("<Q", 1 << 40) + b"{}"}


class _Payload:
    def __reduce__(self):
        return os.mkdir, (str(PICKLE_MARKER),)


def _pickle(name: str) -> Files:
    """A pickle (which would run ``os.mkdir`` if loaded) saved under the safetensors name."""
    return {**adapter_files(name), TENSORS_FILE: pickle.dumps({"heads": _Payload(), "offsets": _Payload()})}


def _config_bytes(data: bytes) -> Callable[[str], Files]:
    return lambda name: {**adapter_files(name), CONFIG_FILE: data}


@dataclass(frozen=True)
class Malformed:
    """One malformed adapter: its files, and what the refusal must say (upload may be refused differently)."""

    id: str
    problem: str
    files: Callable[[str], Files]
    upload_problem: str | None = None
    upload_status: int = 400

    def upload_expectation(self) -> tuple[int, str]:
        return self.upload_status, self.upload_problem or self.problem


CASES: list[Malformed] = [
    # tensor shapes and dtypes
    Malformed("offsets-wrong-width", "'offsets' must be float32 [4, 64]",
              lambda n: adapter_files(n, tensors={"offsets": torch.zeros(4, 32)})),
    Malformed("offsets-one-dim", "'offsets' must be float32 [4, 64]",
              lambda n: adapter_files(n, tensors={"offsets": torch.zeros(256)})),
    Malformed("heads-three-columns", "'heads' must be int64 [K, 2]",
              lambda n: adapter_files(n, tensors={"heads": torch.zeros(4, 3, dtype=torch.int64)})),
    Malformed("offsets-float16", "got torch.float16",
              lambda n: adapter_files(n, tensors={"offsets": torch.zeros(4, 64, dtype=torch.float16)})),
    Malformed("heads-int32", "'heads' must be int64",
              lambda n: adapter_files(n, tensors={"heads": _heads((4, 1), (11, 3), (18, 6), (25, 2)).int()})),
    Malformed("heads-float", "'heads' must be int64",
              lambda n: adapter_files(n, tensors={"heads": _heads((4, 1), (11, 3), (18, 6), (25, 2)).float()})),
    Malformed("missing-offsets", "lacks tensor(s) ['offsets']", lambda n: adapter_files(n, tensors={"offsets": None})),
    Malformed("extra-tensor", "unexpected tensors ['payload']",
              lambda n: adapter_files(n, tensors={"payload": torch.zeros(3)})),
    Malformed("scales-wrong-shape", "'scales' must be float32 [4, 64]",
              lambda n: adapter_files(n, tensors={"scales": torch.zeros(3, 64)})),
    # values
    Malformed("offsets-nan", "'offsets' contains NaN or Inf",
              lambda n: adapter_files(n, tensors={"offsets": _offsets(float("nan"))})),
    Malformed("offsets-inf", "'offsets' contains NaN or Inf",
              lambda n: adapter_files(n, tensors={"offsets": _offsets(float("-inf"))})),
    Malformed("scales-inf", "'scales' contains NaN or Inf",
              lambda n: adapter_files(n, tensors={"scales": _offsets(float("inf"))})),
    # heads
    Malformed("heads-duplicate", "duplicate (layer, head)",
              lambda n: adapter_files(n, tensors={"heads": _heads((4, 1), (11, 3), (11, 3), (25, 2))})),
    Malformed("heads-unsorted", "must be sorted",
              lambda n: adapter_files(n, tensors={"heads": _heads((11, 3), (4, 1), (18, 6), (25, 2))})),
    Malformed("head-layer-out-of-range", "head (30, 2) is outside the base model's 30 layers x 9 heads",
              lambda n: adapter_files(n, tensors={"heads": _heads((4, 1), (11, 3), (18, 6), (30, 2))})),
    Malformed("head-index-out-of-range", "head (18, 9) is outside",
              lambda n: adapter_files(n, tensors={"heads": _heads((4, 1), (11, 3), (18, 9), (25, 2))})),
    Malformed("head-negative", "head (-1, 0) is outside",
              lambda n: adapter_files(n, tensors={"heads": _heads((-1, 0), (11, 3), (18, 6), (25, 2))})),
    Malformed("head-huge-index", f"head ({1 << 62}, 0) is outside",
              lambda n: adapter_files(n, tensors={"heads": _heads((4, 1), (11, 3), (18, 6), (1 << 62, 0))})),
    Malformed("no-heads", "selects no heads",
              lambda n: adapter_files(n, tensors={"heads": torch.zeros(0, 2, dtype=torch.int64),
                                                  "offsets": torch.zeros(0, 64)})),
    # identity: another base model
    Malformed("other-model-size", "num_hidden_layers: adapter has 32, model has 30",
              lambda n: adapter_files(n, config={"base_model": _base(
                  name_or_path="SmolLM2-360M-Instruct", num_hidden_layers=32, num_attention_heads=15,
                  num_key_value_heads=5, hidden_size=960, fingerprint="sha256:" + "3" * 64)})),
    Malformed("other-model-weights", "fingerprint: adapter has 'sha256:4444",
              lambda n: adapter_files(n, config={"base_model": _base(fingerprint="sha256:" + "4" * 64)})),
    Malformed("base-model-wrong-types", "base_model.num_hidden_layers must be a non-negative integer",
              lambda n: adapter_files(n, config={"base_model": _base(num_hidden_layers="30")})),
    Malformed("base-model-missing-field", "base_model is missing ['fingerprint']",
              lambda n: adapter_files(n, config={"base_model": {k: v for k, v in _base().items()
                                                                if k != "fingerprint"}})),
    Malformed("base-model-not-object", "base_model must be an object",
              lambda n: adapter_files(n, config={"base_model": "SmolLM2-135M-Instruct"})),
    # integrity
    Malformed("content-hash-mismatch", "the files were modified or mixed from two adapters",
              lambda n: adapter_files(n, config={"content_sha256": "0" * 64})),
    # files that are not what they claim
    Malformed("truncated", "not a readable safetensors file", _truncated),
    Malformed("not-safetensors", "not a readable safetensors file",
              lambda n: {**adapter_files(n), TENSORS_FILE: b"these are not the tensors you are looking for"}),
    Malformed("pickle-disguised", "not a readable safetensors file", _pickle),
    Malformed("safetensors-huge-header", "not a readable safetensors file", _huge_header),
    Malformed("empty-tensors-file", "not a readable safetensors file",
              lambda n: {**adapter_files(n), TENSORS_FILE: b""}),
    Malformed("huge-tensors-file", "far larger than any LoFiT adapter",
              lambda n: {**adapter_files(n), TENSORS_FILE: MAX_TENSORS_BYTES + 1},
              upload_problem=f"adapter.safetensors is larger than the upload limit ({MAX_TENSORS_BYTES} bytes)"),
    Malformed("missing-tensors-file", "adapter.safetensors not found",
              lambda n: {CONFIG_FILE: adapter_files(n)[CONFIG_FILE]},
              upload_problem="adapter_tensors: Field required", upload_status=422),
    # the config
    Malformed("config-not-json", "not valid JSON", _config_bytes(b"{not json")),
    Malformed("config-not-utf8", "not valid JSON", _config_bytes(b"\xff\xfe{}")),
    Malformed("config-nested-deeply", "nested too deeply", _config_bytes(b"[" * 200_000 + b"]" * 200_000)),
    Malformed("config-not-object", "expected a JSON object", _config_bytes(b"[1, 2, 3]")),
    Malformed("config-other-format", "format is 'peft'", lambda n: adapter_files(n, config={"format": "peft"})),
    Malformed("config-format-version-2", "format_version 2 is not supported",
              lambda n: adapter_files(n, config={"format_version": 2})),
    Malformed("config-without-hash", "required key 'content_sha256' is missing",
              lambda n: {**adapter_files(n), CONFIG_FILE: json.dumps(
                  {k: v for k, v in json.loads(adapter_files(n)[CONFIG_FILE]).items()
                   if k != "content_sha256"}).encode()}),
    Malformed("name-differs", "the folder name must equal the adapter's name",
              lambda n: adapter_files(n, config={"name": "someone-else"})),
]


def write_files(folder: Path, files: Files) -> None:
    folder.mkdir(parents=True)
    for filename, content in files.items():
        if isinstance(content, int):
            with (folder / filename).open("wb") as handle:
                handle.truncate(content)  # sparse: takes no disk space
        else:
            (folder / filename).write_bytes(content)


def upload_bytes(files: Files) -> dict[str, bytes]:
    return {k: bytes(v) if isinstance(v, int) else v for k, v in files.items()}


# -- symbolic links ------------------------------------------------------------------------------------------

def _secret_adapter(outside: Path, name: str) -> Path:
    """A valid adapter ``name`` outside the adapters folder: had the server followed a link to it, it would load."""
    folder = outside / f"secret-{name}"
    if not folder.exists():
        adapter = random_adapter(name, seed=5)
        adapter.metadata["secret"] = SECRET
        adapter.save(folder)
    return folder


def _link_to_folder_outside(entry: Path, outside: Path) -> None:
    entry.symlink_to(_secret_adapter(outside, entry.name), target_is_directory=True)


def _link_to_folder_inside(entry: Path, outside: Path) -> None:
    entry.symlink_to("good", target_is_directory=True)  # a sibling in the adapters folder


def _dangling_link(entry: Path, outside: Path) -> None:
    entry.symlink_to(outside / "does-not-exist")


def _linked_file(filename: str) -> Callable[[Path, Path], None]:
    """A real folder whose ``filename`` links to the matching file of a valid adapter outside."""

    def make(entry: Path, outside: Path) -> None:
        secret = _secret_adapter(outside, entry.name)
        entry.mkdir()
        for name in (CONFIG_FILE, TENSORS_FILE):
            if name == filename:
                (entry / name).symlink_to(secret / name)
            else:
                (entry / name).write_bytes((secret / name).read_bytes())

    return make


@dataclass(frozen=True)
class Link:
    id: str
    problem: str
    make: Callable[[Path, Path], None] = field(repr=False)  # (entry in the adapters folder, a folder outside it)


LINKS: list[Link] = [
    Link("folder-link-outside", "is a symbolic link in the adapters directory", _link_to_folder_outside),
    Link("folder-link-inside", "is a symbolic link in the adapters directory", _link_to_folder_inside),
    Link("dangling-link", "is a symbolic link in the adapters directory", _dangling_link),
    Link("tensors-file-link", "adapter.safetensors is a symbolic link", _linked_file(TENSORS_FILE)),
    Link("config-file-link", "adapter_config.json is a symbolic link", _linked_file(CONFIG_FILE)),
]

# -- names ---------------------------------------------------------------------------------------------------

BAD_NAMES: dict[str, str] = {
    "dot-dot": "..",
    "dot": ".",
    "dot-dot-slash": "../outside",
    "slash": "good/x",
    "backslash": "..\\good",
    "nul": "good\x00x",
    "trailing-newline": "good\n",
    "fullwidth-dots": "\uff0e\uff0e",
    "fullwidth-solidus": "..\uff0fgood",
    "rtl-override": "good\u202egpj.exe",
    "homoglyph": "g\u043e\u043ed",  # Cyrillic o
    "zero-width-space": "go\u200bod",
    "too-long": "a" * 65,
    "leading-dot": ".upload-good",
    "leading-dash": "-good",
    "percent-encoded": "%2e%2e",
    "empty": "",
}

# Folder names that must not be loaded at start-up even though they hold a valid adapter of that name.
BAD_FOLDER_NAMES: dict[str, str] = {k: BAD_NAMES[k] for k in (
    "trailing-newline", "fullwidth-dots", "rtl-override", "homoglyph", "zero-width-space", "too-long",
    "leading-dot", "leading-dash")}


def write_start_up_corpus(adapters: Path, outside: Path) -> None:
    """The whole corpus as start-up finds it: ``boot-<case>`` folders and links, and valid adapters under
    folder names that are not adapter names."""
    for case in CASES:
        write_files(adapters / f"boot-{case.id}", case.files(f"boot-{case.id}"))
    for link in LINKS:
        link.make(adapters / f"boot-{link.id}", outside)
    for name in BAD_FOLDER_NAMES.values():
        random_adapter(name, seed=9).save(adapters / name)
