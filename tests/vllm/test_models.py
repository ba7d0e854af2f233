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


@pytest.mark.parametrize("arch", ["MambaForCausalLM", "Qwen3NextForCausalLM", "JambaForCausalLM"])
def test_hybrid_and_attention_free_models_are_refused_at_start(arch):
    from lofit.vllm import models

    wrapper = getattr(models, "Lofit" + arch)
    model = wrapper.__new__(wrapper)
    with pytest.raises(ValueError, match=f"{arch} is a hybrid, recurrent or attention-free model and is not "
                                         "supported .served and checked: LlamaForCausalLM"):
        models.LofitModelMixin.__init__(model, vllm_config=None)
