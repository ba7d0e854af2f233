"""Which adapters a request asks for, and which bank row each running request holds.

A request names its steering in ``SamplingParams.extra_args`` (``vllm_xargs`` over HTTP):

* ``{"lofit_adapter": "truthfulqa"}``, optionally with ``"lofit_scale": 1.5``;
* ``{"lofit_adapters": {"truthfulqa": 1.0, "mquake": 0.5}}`` for a weighted sum, or the same as a list
  ``["truthfulqa:1.0", "mquake:0.5"]`` (vLLM's ``vllm_xargs`` over HTTP allows lists but not objects).
"""

from __future__ import annotations

import math
from typing import Any

from lofit.vllm.bank import AdapterBank
from lofit.vllm.salt import Combination, CombinationError

ADAPTER_KEY, SCALE_KEY, ADAPTERS_KEY = "lofit_adapter", "lofit_scale", "lofit_adapters"
RESOLVED_KEY = "lofit_resolved"  # [[name, content_sha256, weight], ...], stamped by the engine at admission


def requested_weights(extra_args: dict[str, Any] | None) -> dict[str, float] | None:
    """``{name: weight}`` from a request's ``extra_args``; ``None`` when it asks for no adapter."""
    extra_args = extra_args or {}
    name, mix = extra_args.get(ADAPTER_KEY), extra_args.get(ADAPTERS_KEY)
    if name is not None and mix is not None:
        raise CombinationError(f"give either {ADAPTER_KEY!r} or {ADAPTERS_KEY!r}, not both")
    if mix is not None:
        if isinstance(mix, list) and mix and all(isinstance(item, str) for item in mix):
            mix = dict(_name_and_weight(item) for item in mix)
        if not isinstance(mix, dict) or not mix:
            raise CombinationError(f"{ADAPTERS_KEY!r} must be a non-empty {{name: weight}} object "
                                   "or a list of 'name:weight' strings")
        weights = mix
    elif name is not None:
        if not isinstance(name, str):
            raise CombinationError(f"{ADAPTER_KEY!r} must be an adapter name")
        weights = {name: extra_args.get(SCALE_KEY, 1.0)}
    else:
        return None
    out = {}
    for key, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise CombinationError(f"adapter {key!r}: weight must be a finite number, got {weight!r}")
        out[str(key)] = float(weight)
    return out


def resolved_combination(extra_args: dict[str, Any] | None) -> Combination | None:
    """The exact content a request was admitted with (``None``: no adapter, or not stamped)."""
    parts = (extra_args or {}).get(RESOLVED_KEY)
    return None if parts is None else Combination.from_list(parts)


def _name_and_weight(item: str) -> tuple[str, float]:
    name, sep, weight = item.rpartition(":")
    if not sep:
        return item, 1.0
    try:
        return name, float(weight)
    except ValueError:
        raise CombinationError(f"{item!r}: expected 'name:weight' with a number after the colon") from None


class RequestRows:
    """Bank rows held by running requests: acquired on a request's first step, released when it ends."""

    def __init__(self, bank: AdapterBank) -> None:
        self.bank = bank
        self._held: dict[str, tuple[int, Combination | None]] = {}

    def row_for(self, req_id: str, extra_args: dict[str, Any] | None) -> int:
        held = self._held.get(req_id)
        if held is None:
            combo = resolved_combination(extra_args)
            if combo is None:  # not stamped by the engine guard (e.g. a bare runner in tests): resolve names now
                weights = requested_weights(extra_args)
                combo = None if weights is None else self.bank.combination(weights)
            held = (0, None) if combo is None else self.bank.acquire(combo)
            self._held[req_id] = held
        return held[0]

    def release(self, req_id: str) -> None:
        """Release the row of ``req_id`` (no-op when it holds none)."""
        held = self._held.pop(req_id, None)
        if held is not None and held[1] is not None:
            self.bank.release(held[1])

    def release_finished(self, live: set[str] | Any) -> None:
        """Release the rows of tracked requests that are no longer in ``live``."""
        for req_id in [r for r in self._held if r not in live]:
            self.release(req_id)
