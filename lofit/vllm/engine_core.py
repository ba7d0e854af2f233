"""Every patch LoFiT makes to vLLM's engine core, installed once per process by the plugin's ``register()``.

The inventory of vLLM 0.32 symbols touched here (``tests/vllm/test_vllm_surface.py`` checks each one):

* ``vllm.v1.engine.core.EngineCore.preprocess_add_request(self, request)`` — wrapped: :func:`~lofit.vllm.
  admission.admit` checks and stamps the request's ``sampling_params.extra_args`` and sets its ``cache_salt``
  before vLLM hashes its KV blocks;
* ``EngineCore.collective_rpc(self, method, timeout, args, kwargs)`` — wrapped: adapter loads and unloads
  carry the content hashes of the live requests (``scheduler.requests``, each ``sampling_params.extra_args``;
  :func:`~lofit.vllm.admission.with_pins`) so the workers never evict them, and update the engine's
  ``{name: content_sha256}`` (:func:`~lofit.vllm.admission.record_rpc`);
* ``EngineCore._initialize_kv_caches(self, vllm_config)`` — wrapped: after it, every worker must report a
  hooked runner (:func:`~lofit.vllm.selftest.check_workers`);
* ``EngineCoreProc.run_busy_loop`` (and subclasses defining it) and ``vllm.v1.engine.core_client.
  InprocClient.__init__`` — wrapped: the steering self-test (:func:`~lofit.vllm.selftest.self_test`) runs
  once the scheduler exists;
* ``vllm.v1.engine.llm_engine.LLMEngine.add_request`` — wrapped: an in-process admission error forgets the
  request in the output processor (``output_processor.request_states``, ``abort_requests(ids, internal=True)``).

The worker-side patches are in :mod:`lofit.vllm.worker` (RPC methods on ``WorkerBase``) and
:mod:`lofit.vllm.runner_v1` / :mod:`lofit.vllm.runner_v2` (the per-token row hooks), and
:mod:`lofit.vllm.graph_replays` (``CUDAGraphWrapper.__call__`` and V2's ``CudaGraphManager.run_fullgraph``
counted for the self-test).
"""

from __future__ import annotations

from lofit.vllm.admission import ENGINE_ATTR, admit, loaded_adapters, record_rpc, with_pins
from lofit.vllm.selftest import check_workers, self_test

_MARK = "_lofit_wrapped"


def install() -> None:
    """Wrap the engine core's request admission, ``collective_rpc`` and start-up, once per process."""
    from vllm.v1.engine import core as core_module
    from vllm.v1.engine.core_client import InprocClient

    engine_core = core_module.EngineCore
    if getattr(engine_core.preprocess_add_request, _MARK, False):
        return

    original_preprocess = engine_core.preprocess_add_request
    original_rpc = engine_core.collective_rpc
    original_kv = engine_core._initialize_kv_caches

    def preprocess_add_request(self, request):
        params = request.sampling_params
        if params is not None:
            extra_args, request.cache_salt = admit(loaded_adapters(self), params.extra_args, request.cache_salt)
            params.extra_args = extra_args
        return original_preprocess(self, request)

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        kwargs = with_pins(self, method, kwargs)
        results = original_rpc(self, method, timeout, args, kwargs)
        record_rpc(loaded_adapters(self), method, args, kwargs, results)
        return results

    def _initialize_kv_caches(self, vllm_config):
        result = original_kv(self, vllm_config)
        setattr(self, ENGINE_ATTR, check_workers(self))
        return result

    for name, fn in (("preprocess_add_request", preprocess_add_request), ("collective_rpc", collective_rpc),
                     ("_initialize_kv_caches", _initialize_kv_caches)):
        setattr(fn, _MARK, True)
        setattr(engine_core, name, fn)

    # The self-test needs the scheduler, which exists only once the engine core is fully built: run it
    # when the engine-core process starts its loop, or right after an in-process engine core is built.
    for cls in (core_module.EngineCoreProc, *core_module.EngineCoreProc.__subclasses__()):
        if "run_busy_loop" in vars(cls):
            _wrap_busy_loop(cls)
    original_inproc = InprocClient.__init__

    def inproc_init(self, *args, **kwargs):
        original_inproc(self, *args, **kwargs)
        self_test(self.engine_core)

    InprocClient.__init__ = inproc_init
    _wrap_inproc_add_request()


def _wrap_inproc_add_request() -> None:
    """With the engine core in-process, an admission error reaches ``LLMEngine.add_request`` after the front
    end has registered the request; forget it there too, or ``LLM.generate`` would wait for it forever."""
    from vllm.v1.engine.llm_engine import LLMEngine

    original = LLMEngine.add_request

    def add_request(self, *args, **kwargs):
        before = set(self.output_processor.request_states)
        try:
            return original(self, *args, **kwargs)
        except Exception:
            self.output_processor.abort_requests(set(self.output_processor.request_states) - before, internal=True)
            raise

    LLMEngine.add_request = add_request


def _wrap_busy_loop(cls: type) -> None:
    original = cls.run_busy_loop

    def run_busy_loop(self, *args, **kwargs):
        self_test(self)
        return original(self, *args, **kwargs)

    cls.run_busy_loop = run_busy_loop
