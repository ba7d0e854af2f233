"""Everything about LoFiT steering that crosses a process boundary, in one room (plain Python, no vLLM import).

Front ends (``lofit-serve``, :class:`~lofit.vllm.offline.LofitLLM`, the benchmarks, the engine's self-test) and
the engine core and workers of vLLM meet on three things, all defined here:

1. **The request keys** in ``SamplingParams.extra_args`` (``vllm_xargs`` over vLLM's HTTP API):

   * ``{"lofit_adapter": "truthfulqa"}``, optionally with ``"lofit_scale": 1.5``;
   * ``{"lofit_adapters": {"truthfulqa": 1.0, "mquake": 0.5}}`` for a weighted sum (paper's offsets add per
     head: ``docs/lofit-method.md``), or the same as a list ``["truthfulqa:1.0", "mquake:0.5"]`` (vLLM's
     ``vllm_xargs`` allows lists but not objects);
   * ``"lofit_resolved": [[name, content_sha256, weight], ...]`` — stamped by the engine core at admission
     (:mod:`lofit.vllm.admission`), never by clients: the exact content the workers apply.

   :func:`extra_args_for` writes them, :func:`requested_weights` and :func:`resolved_combination` read them.
2. **The combination and its fingerprint**, which keys vLLM's prefix cache: KV blocks computed under an
   adapter must never be reused by a request with another adapter (or none), so every steered request
   carries ``cache_salt = "lofit:<fingerprint>"`` over the content hash and weight of every adapter in its
   :class:`Combination`. Requests with the same combination share prefixes; a name reloaded with new content
   gets a new fingerprint.
3. **The worker RPC names** (``collective_rpc``), implemented in :mod:`lofit.vllm.worker`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

# -- 1. request keys --------------------------------------------------------------------------------------

ADAPTER_KEY, SCALE_KEY, ADAPTERS_KEY = "lofit_adapter", "lofit_scale", "lofit_adapters"
RESOLVED_KEY = "lofit_resolved"  # [[name, content_sha256, weight], ...], stamped by the engine at admission
CLIENT_KEYS = (ADAPTER_KEY, SCALE_KEY, ADAPTERS_KEY)

AdapterChoice = str | dict[str, float] | None  # a name (strength 1), {name: weight}, or no adapter

# -- 3. worker RPCs (collective_rpc method names; lofit.vllm.worker implements them) ----------------------

RPC_LOAD = "lofit_load"  # (path: str) -> {"name", "content_sha256", "num_heads"}; path on the worker's node
RPC_LOAD_BYTES = "lofit_load_bytes"  # (name: str, config: bytes, tensors: bytes) -> like RPC_LOAD; the files'
#                                     bytes travel with the call, so workers on any node load the same content;
#                                     name = the adapter's own name, or its pinned reference (pinned_reference)
RPC_UNLOAD = "lofit_unload"  # (name: str) -> None
RPC_LIST = "lofit_list"  # () -> {name: content_sha256}
RPC_STATUS = "lofit_status"  # () -> {"bank": bool, "base": BaseModelIdentity dict | None, "runner": "v1"|"v2"|
#                                     "unknown", "hook": bool, "class": str}
RPC_LOAD_SELF_TEST = "lofit_load_self_test"  # (seed: int) -> like RPC_LOAD, under SELF_TEST_ADAPTER
RPC_FULL_GRAPH_REPLAYS = "lofit_full_graph_replays"  # () -> int: FULL CUDA-graph launches in the worker so far
SELF_TEST_ADAPTER = "__lofit_self_test__"
ADAPTER_LOADS = (RPC_LOAD, RPC_LOAD_BYTES)  # the RPCs that make an adapter resident under a name


def pinned_reference(name: str, content_sha256: str) -> str:
    """``name@<content_sha256>``: a reference that always means exactly that content of adapter ``name``."""
    return f"{name}@{content_sha256}"


def split_reference(reference: str) -> tuple[str, str | None]:
    """``(name, content_sha256)`` of ``name@<sha256>``; ``(reference, None)`` for a plain name."""
    name, sep, sha = reference.partition("@")
    return (name, sha) if sep else (reference, None)

# -- 2. combinations and the prefix-cache salt ------------------------------------------------------------

SALT_PREFIX = "lofit:"
MAX_SALT_LENGTH = 128  # vLLM's limit on cache_salt
FORBIDDEN_NAME_CHARS = frozenset("/\\\x00")  # '@' is allowed: a pinned reference is name@<content_sha256>


class CombinationError(ValueError):
    """A malformed request for adapters (empty, a non-finite weight, a bad name)."""


@dataclass(frozen=True)
class Combination:
    """What one request applies: adapters (by name and content hash) with weights, sorted by name."""

    parts: tuple[tuple[str, str, float], ...]  # (name, content_sha256, weight)

    @classmethod
    def of(cls, parts: dict[str, tuple[str, float]]) -> Combination:
        """From ``{name: (content_sha256, weight)}``; zero-weight entries are dropped.

        Raises :class:`CombinationError` for an empty result, a non-finite weight or an empty name, or one with
        a path separator or NUL."""
        out = []
        for name, (sha, weight) in sorted(parts.items()):
            if not name or any(c in FORBIDDEN_NAME_CHARS for c in name):
                raise CombinationError(f"invalid adapter name {name!r}")
            weight = float(weight)
            if not math.isfinite(weight):
                raise CombinationError(f"adapter {name!r}: weight must be a finite number, got {weight}")
            if weight != 0.0:
                out.append((name, sha, weight))
        if not out:
            raise CombinationError("a steered request needs at least one adapter with a non-zero weight")
        return cls(tuple(out))

    @property
    def names(self) -> tuple[str, ...]:
        """The adapter names, in the combination's (sorted) order."""
        return tuple(name for name, _, _ in self.parts)

    @property
    def shas(self) -> tuple[str, ...]:
        """The adapters' content hashes, in the same order as :attr:`names`."""
        return tuple(sha for _, sha, _ in self.parts)

    def as_list(self) -> list[list]:
        """``[[name, content_sha256, weight], ...]``: the form stamped into a request's ``extra_args``."""
        return [[name, sha, weight] for name, sha, weight in self.parts]

    @classmethod
    def from_list(cls, parts: list) -> Combination:
        """Inverse of :meth:`as_list`; raises :class:`CombinationError` for a malformed list."""
        try:
            return cls.of({str(name): (str(sha), weight) for name, sha, weight in parts})
        except (TypeError, ValueError) as exc:
            raise CombinationError(f"malformed resolved adapter combination {parts!r}") from exc

    @property
    def fingerprint(self) -> str:
        """sha256 (hex, 32 chars) over the content hashes and weights; names do not matter."""
        content = [[sha, repr(weight)] for _, sha, weight in self.parts]
        return hashlib.sha256(json.dumps(sorted(content)).encode()).hexdigest()[:32]

    @property
    def cache_salt(self) -> str:
        """The prefix-cache salt of a request steered by this combination: :data:`SALT_PREFIX` + fingerprint."""
        return SALT_PREFIX + self.fingerprint


def reserved_salt_error(client_salt: str | None) -> str | None:
    """Why a client's ``cache_salt`` is refused (it starts with :data:`SALT_PREFIX`, LoFiT's namespace), or ``None``.
    The engine core refuses such a request (:mod:`lofit.vllm.admission`); ``lofit-serve`` refuses it on arrival."""
    if isinstance(client_salt, str) and client_salt.startswith(SALT_PREFIX):
        return (f"cache_salt must not start with {SALT_PREFIX!r}: that namespace is LoFiT's own (steered requests "
                "are salted by their adapters' content)")
    return None


def combine_salt(lofit_salt: str, client_salt: str | None) -> str:
    """Join our salt with a client's own (e.g. a tenant salt), within vLLM's 128-character limit."""
    if not client_salt:
        return lofit_salt
    joined = f"{lofit_salt}:{client_salt}"
    if len(joined) <= MAX_SALT_LENGTH:
        return joined
    return f"{lofit_salt}:{hashlib.sha256(client_salt.encode()).hexdigest()[:32]}"


# -- reading and writing the keys -------------------------------------------------------------------------


def extra_args_for(choice: AdapterChoice) -> dict[str, Any] | None:
    """``SamplingParams.extra_args`` for one request's adapter choice (``None`` for no adapter).

    Raises ``TypeError`` for anything but a name, a ``{name: weight}`` dict or ``None``."""
    if choice is None:
        return None
    if isinstance(choice, str):
        return {ADAPTER_KEY: choice}
    if isinstance(choice, dict):
        return {ADAPTERS_KEY: dict(choice)}
    raise TypeError(f"an adapter choice is a name, a {{name: weight}} dict or None, got {choice!r}")


def requested_weights(extra_args: dict[str, Any] | None) -> dict[str, float] | None:
    """``{name: weight}`` from a request's ``extra_args``; ``None`` when it asks for no adapter.

    Raises :class:`CombinationError` for malformed keys (both forms given, an empty mix, a name given twice in
    the list form, a non-finite or non-numeric weight, a name that is not a string)."""
    extra_args = extra_args or {}
    name, mix = extra_args.get(ADAPTER_KEY), extra_args.get(ADAPTERS_KEY)
    if name is not None and mix is not None:
        raise CombinationError(f"give either {ADAPTER_KEY!r} or {ADAPTERS_KEY!r}, not both")
    if mix is not None:
        if isinstance(mix, list) and mix and all(isinstance(item, str) for item in mix):
            pairs = [_name_and_weight(item) for item in mix]
            mix = {}
            for key, weight in pairs:
                if key in mix:
                    raise CombinationError(f"{ADAPTERS_KEY!r} names {key!r} more than once; give each adapter "
                                           "once with its weight")
                mix[key] = weight
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
