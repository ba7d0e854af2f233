"""Admission in the engine core: every request is checked against the adapters loaded now and stamped.

Every request passes :func:`admit` when the engine core turns it into a scheduler ``Request`` — before its
KV block hashes exist (:mod:`lofit.vllm.engine_core` installs the call). A steered request is checked
against the engine's ``{name: content_sha256}`` (kept by :func:`record_rpc` in step with the workers' loads
and unloads), stamped with the exact content hashes it will use (``extra_args["lofit_resolved"]``), and its
``cache_salt`` becomes the fingerprint of that content (joined with any client salt). So a client that
forgets the salt cannot poison the prefix cache, an unknown adapter is a request error rather than a crash
in the forward pass, and reloading a name never mixes old KV with new content.
"""

from __future__ import annotations

from typing import Any

from lofit.vllm.contract import (
    ADAPTER_LOADS,
    RESOLVED_KEY,
    RPC_UNLOAD,
    Combination,
    CombinationError,
    combine_salt,
    requested_weights,
    reserved_salt_error,
    resolved_combination,
)

ENGINE_ATTR = "_lofit_adapters"  # on the EngineCore: {name: content_sha256}, or None for a non-LoFiT model


def loaded_adapters(core: Any) -> dict[str, str] | None:
    """The engine core's ``{name: content_sha256}`` (``None``: it does not serve a LoFiT model)."""
    return getattr(core, ENGINE_ATTR, None)


class AdmissionError(ValueError):
    """A request the engine refuses: malformed LoFiT arguments, an unknown adapter, a reserved salt."""


def admit(loaded: dict[str, str] | None, extra_args: dict[str, Any] | None,
          client_salt: str | None) -> tuple[dict[str, Any] | None, str | None]:
    """``(extra_args, cache_salt)`` for a request, given the adapters loaded now (``None``: not a LoFiT model).

    Raises :class:`AdmissionError` for anything that must not reach the workers.
    """
    refused = reserved_salt_error(client_salt)
    if refused:
        raise AdmissionError(refused)
    try:
        weights = requested_weights(extra_args)
    except CombinationError as exc:
        raise AdmissionError(f"invalid LoFiT adapter request: {exc}") from exc
    extra_args = None if extra_args is None else {k: v for k, v in extra_args.items() if k != RESOLVED_KEY}
    if weights is None:
        return extra_args, client_salt
    if loaded is None:
        raise AdmissionError("this engine does not serve a LoFiT model wrapper; start it with "
                             "hf_overrides={'architectures': ['Lofit<Architecture>']} to use adapters")
    unknown = sorted(set(weights) - set(loaded))
    if unknown:
        raise AdmissionError(f"unknown adapter(s) {unknown}; loaded: {sorted(loaded)}")
    try:
        combo = Combination.of({name: (loaded[name], weight) for name, weight in weights.items()})
    except CombinationError as exc:
        raise AdmissionError(f"invalid LoFiT adapter request: {exc}") from exc
    return {**extra_args, RESOLVED_KEY: combo.as_list()}, combine_salt(combo.cache_salt, client_salt)


def record_rpc(loaded: dict[str, str] | None, method: Any, args: tuple, kwargs: dict | None, results: list) -> None:
    """Keep the engine's ``{name: content_sha256}`` in step with adapter loads and unloads on the workers."""
    if loaded is None or not isinstance(method, str):
        return
    if method in ADAPTER_LOADS:
        loaded[results[0]["name"]] = results[0]["content_sha256"]
    elif method == RPC_UNLOAD:
        loaded.pop(args[0] if args else (kwargs or {})["name"], None)


def live_content(core: Any) -> list[str]:
    """The content hashes the engine's live requests (waiting, running or preempted) were admitted with."""
    shas: set[str] = set()
    for request in getattr(core.scheduler, "requests", {}).values():
        params = getattr(request, "sampling_params", None)
        combo = resolved_combination(params.extra_args) if params is not None else None
        if combo is not None:
            shas.update(combo.shas)
    return sorted(shas)


def with_pins(core: Any, method: Any, kwargs: dict | None) -> dict | None:
    """``kwargs`` of an adapter load or unload RPC with ``pinned`` = :func:`live_content`, so the workers never
    evict content a live request still needs (other RPCs unchanged)."""
    if loaded_adapters(core) is None or method not in (*ADAPTER_LOADS, RPC_UNLOAD):
        return kwargs
    return {**(kwargs or {}), "pinned": live_content(core)}
