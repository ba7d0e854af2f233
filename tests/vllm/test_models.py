"""The ``Lofit<Arch>`` wrappers (:mod:`lofit.vllm.models`): made on demand for vLLM's native architectures, and
models that cannot be steered refused before anything is built. Fast: no engine."""

from __future__ import annotations

import pytest


def test_a_wrapper_is_made_for_every_checked_architecture():
    import importlib

    from vllm import ModelRegistry

    from lofit.heads import SUPPORTED_ARCHITECTURES
    from lofit.vllm.architectures import WRAPPER_MODULE, native_architectures, wrapper_for

    assert set(SUPPORTED_ARCHITECTURES) <= native_architectures()
    assert "Gemma3ForConditionalGeneration" in native_architectures(), "multimodal models have text decoders too"
    models = importlib.import_module(WRAPPER_MODULE)
    for arch in SUPPORTED_ARCHITECTURES:
        wrapper = getattr(models, wrapper_for(arch))
        assert wrapper.__name__ == "Lofit" + arch and issubclass(wrapper, models.LofitModelMixin)
        assert issubclass(wrapper, ModelRegistry.models[arch].load_model_cls()), arch
        assert getattr(models, wrapper_for(arch)) is wrapper, "made once"
    with pytest.raises(AttributeError, match="no architecture 'NoSuchForCausalLM'"):
        models.LofitNoSuchForCausalLM  # noqa: B018
    with pytest.raises(ValueError, match="'NoSuchForCausalLM' is not one of them"):
        wrapper_for("NoSuchForCausalLM")


@pytest.mark.parametrize(("arch", "message"), [
    ("MambaForCausalLM", "MambaForCausalLM is a hybrid, recurrent or attention-free model"),
    ("Qwen3NextForCausalLM", "Qwen3NextForCausalLM is a hybrid, recurrent or attention-free model"),
    ("JambaForCausalLM", "JambaForCausalLM is a hybrid, recurrent or attention-free model"),
])
def test_models_lofit_cannot_steer_are_refused_before_they_are_built(arch, message):
    from lofit.vllm import models

    wrapper = getattr(models, "Lofit" + arch)
    model = wrapper.__new__(wrapper)
    with pytest.raises(ValueError, match=f"{message}.*not supported .served and checked: LlamaForCausalLM"):
        models.LofitModelMixin.__init__(model, vllm_config=None)


def test_settings_lofit_cannot_steer_under_are_refused_with_the_reason():
    """The engine settings are read from vLLM's own config objects (their fields are checked in
    test_vllm_surface.py); micro-batching and sleep mode cannot be switched on in vLLM's CPU build, so the
    config is given as those objects' attributes."""
    from types import SimpleNamespace

    from lofit.vllm.models import unsupported_settings

    def config(ubatching=False, lora=None, sleep=False):
        return SimpleNamespace(parallel_config=SimpleNamespace(use_ubatching=ubatching), lora_config=lora,
                               model_config=SimpleNamespace(enable_sleep_mode=sleep))

    assert unsupported_settings(config()) == []
    [ubatch] = unsupported_settings(config(ubatching=True))
    assert ubatch.startswith("micro-batching (--enable-dbo / --ubatch-size > 1)")
    [lora] = unsupported_settings(config(lora=object()))
    assert "vLLM's LoRA would skip the steered o_proj" in lora
    [sleep] = unsupported_settings(config(sleep=True))
    assert "does not restore the adapter bank" in sleep
    assert len(unsupported_settings(config(True, object(), True))) == 3
