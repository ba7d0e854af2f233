"""The front-end check: malformed LoFiT ``extra_args`` are refused when a request arrives (HTTP 400 online).

vLLM runs every custom logits processor's ``validate_params`` in the front end before a request reaches
the engine, so this no-op processor is where the request format is checked. Whether a named adapter is
loaded is the caller's to check (the server's registry); the front end cannot see the workers' banks.
Enable with ``logits_processors=["lofit.vllm.validator:LofitRequestValidator"]``
(:data:`lofit.vllm.architectures.VALIDATOR`; :func:`~lofit.vllm.architectures.lofit_engine_args` adds it).
"""

from __future__ import annotations

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from lofit.vllm.contract import CombinationError, requested_weights


class LofitRequestValidator(LogitsProcessor):
    """Validates ``lofit_adapter`` / ``lofit_scale`` / ``lofit_adapters``; leaves logits untouched."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Raise ``ValueError`` (vLLM answers 400) for malformed LoFiT keys in ``extra_args``."""
        try:
            requested_weights(sampling_params.extra_args)
        except CombinationError as exc:
            raise ValueError(f"invalid LoFiT adapter request: {exc}") from exc

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        """Nothing to hold: the processor only validates."""

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits, unchanged."""
        return logits

    def is_argmax_invariant(self) -> bool:
        """True: it never changes a token choice."""
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """No state to update."""
