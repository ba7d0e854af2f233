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
    args = settings.vllm_args
    assert (args.enforce_eager, args.max_num_batched_tokens, args.seed) == (True, 256, 3)


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


def test_vllm_serve_flags_pass_through_and_keys_stay_ours(model_dir):
    """Every `vllm serve` flag works (tools, chat templates, ...); the keys never reach vLLM's own check."""
    from server.app import vllm_args

    settings = parse(["--model", str(model_dir), "--api-key", "k1", "--tool-call-parser", "hermes",
                      "--enable-auto-tool-choice", "--enable-tokenizer-info-endpoint"])
    args = vllm_args(settings)
    assert (args.tool_call_parser, args.enable_auto_tool_choice, args.enable_tokenizer_info_endpoint) == (
        "hermes", True, True)
    assert args.api_key is None and args.model == str(model_dir)
    assert args.hf_overrides == {"architectures": ["LofitLlamaForCausalLM"]}
    assert "lofit.vllm.validator:LofitRequestValidator" in args.logits_processors
    assert args.served_model_name == [model_dir.name] and args.disable_log_stats is False


@pytest.mark.parametrize("flag", [["--uds", "/tmp/x.sock"], ["--api-server-count", "2"], ["--headless"]])
def test_vllm_serve_modes_lofit_serve_does_not_run_are_refused(model_dir, flag):
    with pytest.raises(SystemExit, match="not supported by lofit-serve"):
        parse(["--model", str(model_dir), *flag])


def test_chat_control_tokens_are_text_unless_trusted(model_dir, monkeypatch):
    assert parse(["--model", str(model_dir)]).trust_chat_control_tokens is False
    assert parse(["--model", str(model_dir), "--trust-chat-control-tokens"]).trust_chat_control_tokens is True
    monkeypatch.setenv("LOFIT_TRUST_CHAT_CONTROL_TOKENS", "1")
    assert parse(["--model", str(model_dir)]).trust_chat_control_tokens is True


def test_the_playground_is_on_unless_turned_off(model_dir, monkeypatch):
    from server.app import create_app

    on, off = parse(["--model", str(model_dir)]), parse(["--model", str(model_dir), "--no-ui"])
    assert on.ui is True and off.ui is False
    paths = lambda settings: {getattr(route, "path", None) for route in create_app(settings).routes}  # noqa: E731
    assert "/ui" in paths(on) and "/ui" not in paths(off)
    monkeypatch.setenv("LOFIT_NO_UI", "1")
    assert parse(["--model", str(model_dir)]).ui is False


def test_the_admin_key_is_never_the_inference_key(model_dir):
    """lofit-serve refuses to start with one key for both (vLLM's single --api-key is not enough)."""
    with pytest.raises(SystemExit):
        parse(["--model", str(model_dir), "--api-key", "same", "--admin-key", "same"])


def test_a_port_in_use_is_refused_before_the_engine_starts(model_dir, capsys):
    import socket

    from server.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exit_info:
            main(["--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port)])
    assert exit_info.value.code == 2 and f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.parametrize("architectures", [["BertModel"], []])
def test_an_architecture_vllm_does_not_implement_is_refused_before_an_engine(tmp_path, capsys, architectures):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": architectures}))
    with pytest.raises(SystemExit) as exc:
        parse(["--model", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "LoFiT's vLLM plugin serves the architectures vLLM implements natively" in err
    assert "checked: LlamaForCausalLM" in err


def test_a_qwen3_checkpoint_gets_its_wrapper(tmp_path):
    from server.app import vllm_args

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"]}))
    assert vllm_args(parse(["--model", str(tmp_path)])).hf_overrides == {"architectures": ["LofitQwen3ForCausalLM"]}


@pytest.mark.parametrize("arch", ["MambaForCausalLM", "JambaForCausalLM"])
def test_a_hybrid_or_recurrent_model_is_refused_with_that_reason_before_any_engine(arch, tmp_path, capsys):
    """vLLM's class for the architecture says it is hybrid/recurrent: that is the reason given (not a missing
    config field or tensor), read from the config alone."""
    from server.cli import check_steerable

    (tmp_path / "config.json").write_text(json.dumps({"architectures": [arch], "num_hidden_layers": 2}))
    with pytest.raises(SystemExit) as exc:
        check_steerable(tmp_path)
    assert exc.value.code == 2
    assert f"{arch} is a hybrid, recurrent or attention-free model" in capsys.readouterr().err


def test_a_missing_model_directory_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(["--model", str(tmp_path / "nowhere")])
    assert exc.value.code == 2
    assert "--model" in (err := capsys.readouterr().err) and "no such file or directory" in err
    with pytest.raises(SystemExit):
        parse(["--model", str(tmp_path)])
    assert "not a Hugging Face checkpoint directory (no config.json)" in capsys.readouterr().err
