"""The adapter format: round trip, and a specific, actionable error for every way a directory is broken."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lofit.adapter import (
    CONFIG_FILE,
    TENSORS_FILE,
    AdapterError,
    AdapterFileMissingError,
    AdapterFormatError,
    AdapterHashMismatchError,
    AdapterHeadsError,
    AdapterShapeError,
    AdapterValueError,
    BaseModelMismatchError,
    LofitAdapter,
    content_sha256,
    load_adapter,
)
from lofit.heads import BaseModelIdentity


@pytest.fixture()
def adapter(stories_identity: BaseModelIdentity) -> LofitAdapter:
    gen = torch.Generator().manual_seed(0)
    return LofitAdapter(heads=torch.tensor([[3, 1], [0, 2], [4, 7]]),
                        offsets=torch.randn(3, 8, generator=gen), scales=torch.randn(3, 8, generator=gen),
                        base_model=stories_identity, name="demo",
                        task="truthfulqa", metadata={"metrics": {"mc1": 0.5}})


@pytest.fixture()
def saved(adapter: LofitAdapter, tmp_path: Path) -> Path:
    return adapter.save(tmp_path / "demo", extra_files={"heads.png": b"\x89PNG fake"})


def rewrite_tensors(directory: Path, **changes: torch.Tensor | None) -> None:
    """Replace tensors and re-record the content hash, so only the intended defect remains."""
    tensors = load_file(str(directory / TENSORS_FILE))
    for name, value in changes.items():
        if value is None:
            tensors.pop(name)
        else:
            tensors[name] = value
    save_file(tensors, str(directory / TENSORS_FILE))
    config = json.loads((directory / CONFIG_FILE).read_text())
    config["content_sha256"] = content_sha256(tensors)
    (directory / CONFIG_FILE).write_text(json.dumps(config))


def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / CONFIG_FILE).read_text())
    config.update(changes)
    (directory / CONFIG_FILE).write_text(json.dumps(config))


def test_round_trip_keeps_everything(adapter: LofitAdapter, saved: Path, stories_identity):
    loaded = load_adapter(saved, expect_base=stories_identity)
    assert loaded.head_list() == [(0, 2), (3, 1), (4, 7)], "rows are stored sorted by (layer, head)"
    assert torch.equal(loaded.offsets, adapter.offsets) and torch.equal(loaded.heads, adapter.heads)
    raw = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))  # the fixture's unsorted rows
    assert torch.equal(loaded.offsets[0], raw[1]), "each offset row moves with its head when sorting"
    assert torch.equal(loaded.scales, adapter.scales)
    assert loaded.base_model == stories_identity
    assert loaded.content_sha256 == adapter.content_sha256
    assert loaded.metadata["metrics"] == {"mc1": 0.5}
    config = json.loads((saved / CONFIG_FILE).read_text())
    assert config["format"] == "lofit-adapter" and config["format_version"] == 1
    assert config["task"] == "truthfulqa" and config["name"] == "demo"
    assert {"fingerprint", "num_hidden_layers", "num_attention_heads", "head_dim", "hidden_size",
            "architecture", "name_or_path"} <= set(config["base_model"])
    assert config["created_at"] and config["package_version"]
    tensors = load_file(str(saved / TENSORS_FILE))
    assert tensors["heads"].dtype == torch.int64 and tensors["offsets"].dtype == torch.float32
    assert (saved / "heads.png").read_bytes() == b"\x89PNG fake"
    assert saved.stat().st_mode & 0o777 == 0o755, "other users (a server) can read the adapter"
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in saved.iterdir())


def test_save_replaces_an_existing_adapter_whole(adapter: LofitAdapter, saved: Path):
    (saved / "stale.txt").write_text("from an older version")
    new = LofitAdapter(heads=adapter.heads[:1], offsets=adapter.offsets[:1] + 1,
                       base_model=adapter.base_model, name="demo")
    new.save(saved)
    assert not (saved / "stale.txt").exists()
    assert load_adapter(saved).num_heads == 1
    assert [p.name for p in saved.parent.iterdir()] == ["demo"], "no staging or backup folders are left"


def test_content_hash_changes_with_any_offset(adapter: LofitAdapter):
    changed = adapter.offsets.clone()
    changed[2, 5] += 1e-6
    other = LofitAdapter(heads=adapter.heads, offsets=changed, scales=adapter.scales,
                         base_model=adapter.base_model, name="x")
    assert other.content_sha256 != adapter.content_sha256


def test_missing_directory_and_files(saved: Path, tmp_path: Path):
    with pytest.raises(AdapterFileMissingError, match="directory not found"):
        load_adapter(tmp_path / "nope")
    (saved / TENSORS_FILE).unlink()
    with pytest.raises(AdapterFileMissingError, match=TENSORS_FILE):
        load_adapter(saved)
    (saved / CONFIG_FILE).unlink()
    with pytest.raises(AdapterFileMissingError, match=CONFIG_FILE):
        load_adapter(saved)


@pytest.mark.parametrize(("changes", "message"), [
    ({"format": "peft-lora"}, "format is 'peft-lora'"),
    ({"format_version": 2}, "format_version 2 is not supported"),
])
def test_unknown_format_or_version(saved: Path, changes, message):
    edit_config(saved, **changes)
    with pytest.raises(AdapterFormatError, match=message):
        load_adapter(saved)


def test_config_that_is_not_json(saved: Path):
    (saved / CONFIG_FILE).write_text("{not json")
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        load_adapter(saved)


def test_tensor_file_that_is_not_safetensors(saved: Path):
    (saved / TENSORS_FILE).write_bytes(b"\x80\x04\x95pickle-ish bytes that are not safetensors")
    with pytest.raises(AdapterFormatError, match="not a readable safetensors"):
        load_adapter(saved)


def test_truncated_tensor_file(saved: Path):
    data = (saved / TENSORS_FILE).read_bytes()
    (saved / TENSORS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFormatError):
        load_adapter(saved)


@pytest.mark.parametrize(("changes", "error", "message"), [
    ({"offsets": torch.zeros(3, 16)}, AdapterShapeError, r"float32 \[3, 8\]"),
    ({"offsets": torch.zeros(3, 8, dtype=torch.float16)}, AdapterShapeError, "float16"),
    ({"heads": torch.tensor([[0, 2], [3, 1], [4, 7]], dtype=torch.int32)}, AdapterShapeError, "int64"),
    ({"scales": torch.zeros(2, 8)}, AdapterShapeError, "'scales'"),
    ({"offsets": None}, AdapterFormatError, "offsets"),
    ({"extra": torch.zeros(1)}, AdapterFormatError, "unexpected tensors"),
    ({"heads": torch.tensor([[0, 2], [3, 1], [5, 0]])}, AdapterHeadsError, "outside"),
    ({"heads": torch.tensor([[0, 2], [3, 8], [4, 7]])}, AdapterHeadsError, "outside"),
    ({"heads": torch.tensor([[0, -1], [3, 1], [4, 7]])}, AdapterHeadsError, "outside"),
    ({"heads": torch.tensor([[0, 2], [3, 1], [3, 1]])}, AdapterHeadsError, "duplicate"),
    ({"heads": torch.tensor([[3, 1], [0, 2], [4, 7]])}, AdapterHeadsError, "sorted"),
    ({"offsets": torch.tensor([[float("nan")] * 8] * 3)}, AdapterValueError, "NaN or Inf"),
    ({"scales": torch.full((3, 8), float("inf"))}, AdapterValueError, "NaN or Inf"),
])
def test_invalid_tensors(saved: Path, changes, error, message):
    rewrite_tensors(saved, **changes)
    with pytest.raises(error, match=message):
        load_adapter(saved)


def test_tampered_tensors_fail_the_content_hash(saved: Path):
    tensors = load_file(str(saved / TENSORS_FILE))
    tensors["offsets"][0, 0] += 1
    save_file(tensors, str(saved / TENSORS_FILE))
    with pytest.raises(AdapterHashMismatchError, match="modified"):
        load_adapter(saved)


def test_adapter_for_another_base_model(saved: Path, stories_identity: BaseModelIdentity):
    bigger = BaseModelIdentity(**{**stories_identity.to_dict(), "name_or_path": "SmolLM2-135M-Instruct",
                                  "num_hidden_layers": 30, "num_attention_heads": 9, "head_dim": 64,
                                  "hidden_size": 576, "fingerprint": "sha256:" + "1" * 64})
    with pytest.raises(BaseModelMismatchError) as info:
        load_adapter(saved, expect_base=bigger)
    message = str(info.value)
    assert "num_hidden_layers: adapter has 5, model has 30" in message
    assert "SmolLM2-135M-Instruct" in message and "lofit-train" in message


def test_same_shapes_but_other_weights_is_a_mismatch(saved: Path, stories_identity: BaseModelIdentity):
    retrained = BaseModelIdentity(**{**stories_identity.to_dict(), "fingerprint": "sha256:" + "2" * 64})
    with pytest.raises(BaseModelMismatchError, match="fingerprint"):
        load_adapter(saved, expect_base=retrained)


def test_invalid_adapter_cannot_be_constructed(stories_identity: BaseModelIdentity):
    with pytest.raises(AdapterHeadsError, match="duplicate"):
        LofitAdapter(heads=torch.tensor([[1, 1], [1, 1]]), offsets=torch.zeros(2, 8),
                     base_model=stories_identity, name="dup")
    with pytest.raises(AdapterHeadsError, match="no heads"):
        LofitAdapter(heads=torch.zeros(0, 2, dtype=torch.int64), offsets=torch.zeros(0, 8),
                     base_model=stories_identity, name="empty")


def test_huge_tensor_file_is_refused_before_reading(saved: Path):
    with (saved / TENSORS_FILE).open("ab") as handle:
        handle.truncate(65 * 1024 * 1024)
    with pytest.raises(AdapterFormatError, match="far larger"):
        load_adapter(saved)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("num_hidden_layers", "5", "base_model.num_hidden_layers must be a non-negative integer, got '5'"),
    ("head_dim", 8.0, "base_model.head_dim must be a non-negative integer"),
    ("num_attention_heads", None, "base_model.num_attention_heads must be a non-negative integer"),
    ("hidden_size", True, "base_model.hidden_size must be a non-negative integer"),
    ("num_key_value_heads", -1, "base_model.num_key_value_heads must be a non-negative integer"),
    ("fingerprint", 7, "base_model.fingerprint must be a string"),
])
def test_base_model_fields_of_the_wrong_type_are_a_format_error(saved: Path, field, value, message):
    config = json.loads((saved / CONFIG_FILE).read_text())
    edit_config(saved, base_model={**config["base_model"], field: value})
    with pytest.raises(AdapterFormatError, match=message):
        load_adapter(saved)


def test_config_nested_too_deeply_or_too_large_is_a_format_error(saved: Path):
    (saved / CONFIG_FILE).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AdapterFormatError, match="nested too deeply"):
        load_adapter(saved)
    with (saved / CONFIG_FILE).open("ab") as handle:
        handle.truncate(5 * 1024 * 1024)
    with pytest.raises(AdapterFormatError, match="far larger than any adapter config"):
        load_adapter(saved)


def test_random_adapters_are_deterministic_in_their_seed(stories_identity: BaseModelIdentity):
    layout = stories_identity.layout
    one = LofitAdapter.random(stories_identity, "r", 5, seed=3, scale=0.5)
    assert one.content_sha256 == LofitAdapter.random(stories_identity, "r", 5, seed=3, scale=0.5).content_sha256
    assert one.content_sha256 != LofitAdapter.random(stories_identity, "r", 5, seed=4, scale=0.5).content_sha256
    assert one.num_heads == 5 and len(set(one.head_list())) == 5 and one.offsets.shape == (5, layout.head_dim)
    every = LofitAdapter.random(stories_identity, "all", "all")
    assert every.num_heads == layout.num_layers * layout.num_heads
    pairs = LofitAdapter.random(stories_identity, "p", [(1, 0), (0, 1)], seed=2, scale=2.0)
    assert pairs.head_list() == [(0, 1), (1, 0)]
    gen = torch.Generator().manual_seed(2)
    assert torch.equal(pairs.offsets, (2.0 * torch.randn(2, layout.head_dim, generator=gen))[[1, 0]])


@pytest.mark.parametrize(("heads", "error"), [(0, ValueError), (10**6, ValueError), ("some", ValueError),
                                              ([(99, 0)], AdapterError)])
def test_random_adapters_refuse_impossible_heads(stories_identity: BaseModelIdentity, heads, error):
    with pytest.raises(error):
        LofitAdapter.random(stories_identity, "r", heads)
