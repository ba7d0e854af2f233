"""Every vLLM symbol the plugin patches or subclasses still exists with the parameters it relies on.

Fast (no engine). The inventory is the docstring of :mod:`lofit.vllm.engine_core` (engine-core patches) plus the
worker and runner hooks; a vLLM upgrade that renames or reshapes one of them fails here by name, with a clear
message, instead of as a start-up error deep inside an engine test.
"""

from __future__ import annotations

import inspect

import pytest


def params_of(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_engine_core_methods_that_engine_core_py_wraps():
    from vllm.v1.engine.core import EngineCore, EngineCoreProc

    assert params_of(EngineCore.preprocess_add_request) == ["self", "request"]
    assert params_of(EngineCore.collective_rpc)[:5] == ["self", "method", "timeout", "args", "kwargs"]
    assert params_of(EngineCore._initialize_kv_caches)[:2] == ["self", "vllm_config"]
    loops = [cls for cls in (EngineCoreProc, *EngineCoreProc.__subclasses__()) if "run_busy_loop" in vars(cls)]
    assert loops, "no EngineCoreProc class defines run_busy_loop: the self-test would never run"
    for name in ("add_request", "step_fn", "scheduler"):  # what the self-test drives
        assert name in inspect.getsource(EngineCore), f"EngineCore no longer has {name}"


def test_in_process_client_and_llm_engine_hooks():
    from vllm.v1.engine.core_client import InprocClient
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.engine.output_processor import OutputProcessor

    assert "self.engine_core" in inspect.getsource(InprocClient.__init__)
    assert "self.output_processor" in inspect.getsource(LLMEngine.__init__)
    assert "request_states" in inspect.getsource(OutputProcessor.__init__)
    assert "internal" in params_of(OutputProcessor.abort_requests)


def test_engine_core_request_fields_that_admission_reads_and_writes():
    from vllm.v1.engine import EngineCoreRequest

    fields = set(getattr(EngineCoreRequest, "__struct_fields__", ()))
    assert {"request_id", "prompt_token_ids", "sampling_params", "cache_salt", "lora_request"} <= fields
    from vllm import SamplingParams

    assert SamplingParams(extra_args={"lofit_adapter": "a"}).clone().extra_args == {"lofit_adapter": "a"}


def test_worker_base_takes_the_rpc_methods():
    from vllm.v1.worker.worker_base import WorkerBase

    from lofit.vllm.contract import RPC_LIST, RPC_LOAD, RPC_LOAD_SELF_TEST, RPC_STATUS, RPC_UNLOAD
    from lofit.vllm.worker import LofitWorkerMethods

    for name in (RPC_LOAD, RPC_UNLOAD, RPC_LIST, RPC_STATUS, RPC_LOAD_SELF_TEST):
        assert callable(getattr(LofitWorkerMethods, name)), name
        own = vars(WorkerBase).get(name)
        assert own is None or own is vars(LofitWorkerMethods)[name], f"vLLM's WorkerBase defines {name} itself"


def test_v1_runner_forward_hook_target():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert params_of(GPUModelRunner._model_forward)[:3] == ["self", "input_ids", "positions"]
    source = inspect.getsource(GPUModelRunner)
    for attr in ("self.input_batch", "self.query_start_loc", "self.requests"):
        assert attr in source, f"the V1 runner no longer has {attr}"


def test_v2_runner_model_state_methods_we_override():
    pytest.importorskip("vllm.v1.worker.gpu.model_states.default")
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState

    assert params_of(DefaultModelState.__init__)[1:5] == ["vllm_config", "model", "encoder_cache", "device"]
    assert params_of(DefaultModelState.add_request)[1:3] == ["req_index", "new_req_data"]
    assert params_of(DefaultModelState.remove_request)[1:2] == ["req_id"]
    assert params_of(DefaultModelState.prepare_inputs)[1:3] == ["input_batch", "req_states"]
    assert params_of(DefaultModelState.prepare_dummy_inputs)[1:3] == ["num_reqs", "num_tokens"]


@pytest.mark.parametrize("module_class", ["llama:LlamaForCausalLM", "mistral:MistralForCausalLM",
                                          "qwen2:Qwen2ForCausalLM"])
def test_wrapped_model_classes_take_vllm_config_and_prefix(module_class):
    import importlib

    module, name = module_class.split(":")
    cls = getattr(importlib.import_module(f"vllm.model_executor.models.{module}"), name)
    assert {"vllm_config", "prefix"} <= set(params_of(cls.__init__))


def test_attention_layers_the_projections_are_found_from():
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.model_executor.layers.attention.mla_attention import MLAAttention
    from vllm.model_executor.layers.linear import LinearBase, RowParallelLinear
    from vllm.model_executor.models.interfaces import has_inner_state, is_attention_free, is_hybrid
    from vllm.v1.attention.backend import AttentionType

    for name in ("num_heads", "head_size_v", "attn_type", "layer_name"):
        assert f"self.{name} =" in inspect.getsource(Attention.__init__), name
    for name in ("num_heads", "v_head_dim"):
        assert f"self.{name} =" in inspect.getsource(MLAAttention.__init__), name
    assert issubclass(RowParallelLinear, LinearBase) and "input_size_per_partition" in inspect.getsource(
        RowParallelLinear.__init__)
    assert AttentionType.DECODER == "decoder" and callable(is_hybrid) and callable(is_attention_free)
    assert callable(has_inner_state)


def test_engine_settings_the_wrappers_refuse_are_read_from_these_fields():
    from vllm.config import ModelConfig, ParallelConfig, VllmConfig

    assert ParallelConfig(enable_dbo=True).use_ubatching and ParallelConfig(ubatch_size=2).use_ubatching
    assert not ParallelConfig().use_ubatching
    assert "enable_sleep_mode" in ModelConfig.__dataclass_fields__
    assert "lora_config" in VllmConfig.__dataclass_fields__


def test_full_graph_replay_points_the_self_test_counts():
    from vllm.compilation.cuda_graph import CUDAGraphWrapper
    from vllm.config import CompilationConfig, CUDAGraphMode
    from vllm.forward_context import ForwardContext, get_forward_context, is_forward_context_available  # noqa: F401
    from vllm.v1.worker.gpu.cudagraph_utils import CudaGraphManager
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner

    assert params_of(CudaGraphManager.run_fullgraph)[:2] == ["self", "desc"]
    assert "cudagraph_manager.run_fullgraph(" in inspect.getsource(V2Runner), "V2 replays FULL graphs elsewhere"
    assert "self.runtime_mode" in inspect.getsource(CUDAGraphWrapper)
    assert "cudagraph_runtime_mode" in ForwardContext.__dataclass_fields__
    assert CUDAGraphMode.FULL_AND_PIECEWISE.decode_mode() == CUDAGraphMode.FULL
    assert {"cudagraph_mode", "max_cudagraph_capture_size"} <= set(CompilationConfig.__dataclass_fields__)
