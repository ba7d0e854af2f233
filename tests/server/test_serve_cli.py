"""``lofit-serve`` settings from flags and ``LOFIT_*`` environment variables (the container's interface)."""

from __future__ import annotations

import json

import pytest

from server.cli import env_name, parse


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    return tmp_path


def test_env_name_follows_the_flag():
    assert env_name("--max-model-len") == "LOFIT_MAX_MODEL_LEN"
    assert env_name("--api-key") == "LOFIT_API_KEY"


def test_environment_sets_defaults_and_flags_win(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LOFIT_MODEL", str(model_dir))
    monkeypatch.setenv("LOFIT_ADAPTERS_DIR", str(tmp_path / "adapters"))
    monkeypatch.setenv("LOFIT_HOST", "0.0.0.0")
    monkeypatch.setenv("LOFIT_PORT", "9000")
    monkeypatch.setenv("LOFIT_MAX_MODEL_LEN", "1024")
    monkeypatch.setenv("LOFIT_KV_CACHE_GIB", "3")
    monkeypatch.setenv("LOFIT_API_KEY", "k1")
    monkeypatch.setenv("LOFIT_ADMIN_KEY", "k2")
    monkeypatch.setenv("LOFIT_ENGINE_ARGS", "--enforce-eager --max-num-batched-tokens 256")
    settings = parse(["--port", "9100", "--seed", "3"])
    assert settings.model == model_dir
    assert settings.adapters_dir == tmp_path / "adapters"
    assert (settings.host, settings.port, settings.max_model_len, settings.kv_cache_gib) == ("0.0.0.0", 9100,
                                                                                              1024, 3)
    assert (settings.api_key, settings.admin_key) == ("k1", "k2")
    assert settings.engine_args == {"enforce_eager": True, "max_num_batched_tokens": 256, "seed": 3}


def test_a_bad_environment_value_is_a_clear_error(model_dir, monkeypatch, capsys):
    monkeypatch.setenv("LOFIT_MODEL", str(model_dir))
    monkeypatch.setenv("LOFIT_MAX_NUM_SEQS", "many")
    with pytest.raises(SystemExit) as exc:
        parse([])
    assert exc.value.code == 2
    assert "LOFIT_MAX_NUM_SEQS='many'" in capsys.readouterr().err


def test_an_unknown_engine_flag_in_the_environment_is_refused(model_dir, monkeypatch):
    monkeypatch.setenv("LOFIT_MODEL", str(model_dir))
    monkeypatch.setenv("LOFIT_ENGINE_ARGS", "--no-such-flag 1")
    with pytest.raises(SystemExit, match="unknown flag --no-such-flag"):
        parse([])


def test_the_kv_cache_size_is_whole_gib(model_dir, monkeypatch, capsys):
    """vLLM's CPU backend reads VLLM_CPU_KVCACHE_SPACE as an integer: 1.5 would only fail inside the engine."""
    monkeypatch.setenv("LOFIT_MODEL", str(model_dir))
    monkeypatch.setenv("LOFIT_KV_CACHE_GIB", "1.5")
    with pytest.raises(SystemExit):
        parse([])
    assert "LOFIT_KV_CACHE_GIB='1.5'" in capsys.readouterr().err
    monkeypatch.delenv("LOFIT_KV_CACHE_GIB")
    with pytest.raises(SystemExit):
        parse(["--kv-cache-gib", "0"])
    assert "at least 1" in capsys.readouterr().err
