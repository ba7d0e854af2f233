"""A request's steering choice in the API server: which adapters, at what weights, and the name it answers as.

One set of rules for every route, vLLM's (``/v1/completions``, ``/v1/chat/completions``, ``/v1/responses``,
``/tokenize``, ...) and ours (``POST /generate``):

* ``model`` = the served base name (or absent) → no adapter; ``model`` = a loaded adapter's name → that adapter
  at strength 1, and every response says ``model: <that name>``; any other name → 404, as vLLM answers.
* Optional fields choose the steering exactly as on ``POST /generate``: ``adapter`` (with ``adapter_scale``,
  default 1) or ``adapters`` (``{name: weight}``, or ``["name:weight", ...]``), never both. They may be top-level
  body fields (the OpenAI SDK's ``extra_body``) or keys of ``vllm_xargs``; the plugin's own keys
  (``lofit_adapter``, ``lofit_scale``, ``lofit_adapters``) are accepted there too. Give them in one place only.
* With ``model`` = adapter ``A``, the fields may only refine ``A``: ``adapter_scale`` sets its strength,
  ``adapter`` must be ``A``, ``adapters`` must include ``A``. ``adapter_scale`` without an adapter is an error.
* Weights are finite numbers in [-100, 100]; at most 16 adapters; zero weights drop out (all zero = base model).

A steered request is handed to the engine as a :class:`Steering`, a subclass of vLLM's ``LoRARequest``: vLLM's
serving layer then names responses after it (``OpenAIServingModels.model_name``) and passes it to the engine
client, which turns it into the plugin's request keys (:mod:`server.engine_client`); no LoRA is involved.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import msgspec
from vllm.exceptions import VLLMNotFoundError, VLLMValidationError
from vllm.lora.request import LoRARequest

from lofit.vllm.contract import ADAPTER_KEY, ADAPTERS_KEY, SCALE_KEY, CombinationError, requested_weights

ADAPTER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # also the folder name under --adapters-dir
ADAPTER_REFERENCE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}(@[0-9a-f]{64})?$"  # a name, or name@<content_sha256>
MAX_WEIGHT, MAX_ADAPTERS = 100.0, 16
# request field -> the plugin's key with the same meaning
FIELDS = {"adapter": ADAPTER_KEY, "adapter_scale": SCALE_KEY, "adapters": ADAPTERS_KEY}
STEERING_KEYS = frozenset(FIELDS) | frozenset(FIELDS.values())  # every key that chooses steering
_REFERENCE = re.compile(ADAPTER_REFERENCE)


class Steering(LoRARequest, omit_defaults=True, array_like=True):
    """A steered request as vLLM's serving layer carries it: ``lora_name`` is the name responses carry,
    ``weights`` the adapters applied ``{name: weight}`` (empty: none). Never reaches vLLM's LoRA code: the
    engine client replaces it with ``SamplingParams.extra_args`` (:func:`server.engine_client`)."""

    weights: dict[str, float] = msgspec.field(default_factory=dict)

    @classmethod
    def of(cls, name: str, weights: Mapping[str, float], root: str = "lofit") -> Steering:
        """``root`` is what ``GET /v1/models`` shows as the card's ``root`` (vLLM puts the adapter's path there;
        the server shows the name, never a path)."""
        return cls(lora_name=name, lora_int_id=1, lora_path=root, weights=dict(weights))

    @property
    def label(self) -> str | None:
        """``name``, ``name*0.5`` or ``a*1+b*0.5`` (``None`` for no adapter): how ``/generate`` names the mix."""
        if not self.weights:
            return None
        if len(self.weights) == 1:
            [(name, weight)] = self.weights.items()
            return name if weight == 1.0 else f"{name}*{weight:g}"
        return "+".join(f"{n}*{w:g}" for n, w in sorted(self.weights.items()))


def check_name(name: Any) -> str:
    """The adapter name (or pinned reference ``name@<content_sha256>``), or :class:`VLLMValidationError` when it
    is not one (letters, digits, ``._-``, ≤ 64; the hash: 64 lower-case hex digits)."""
    if not isinstance(name, str) or not _REFERENCE.fullmatch(name):
        raise VLLMValidationError(f"invalid adapter name {name!r}: use letters, digits, '.', '_' or '-' (at most "
                                  "64, starting with a letter or digit), optionally followed by @ and the 64 hex "
                                  "digits of a content_sha256", parameter="adapter")
    return name


def named_adapters(body: Any) -> set[str]:
    """Every well-formed adapter name or reference a request body names, wherever a route reads one (``model``,
    ``adapter``, ``adapters`` and the plugin's keys, in the body or in ``vllm_xargs``), leniently: malformed
    choices are left for the route to refuse. How the server learns, before routing, what to load on a miss."""
    if not isinstance(body, dict):
        return set()
    names = {body.get("model")}
    for keys in (body, body.get("vllm_xargs")):
        if not isinstance(keys, dict):
            continue
        for key in ("adapter", ADAPTER_KEY):
            names.add(keys.get(key))
        for key in ("adapters", ADAPTERS_KEY):
            mix = keys.get(key)
            if isinstance(mix, dict):
                names.update(mix)
            elif isinstance(mix, list):
                names.update(item.rpartition(":")[0] or item for item in mix if isinstance(item, str))
    return {n for n in names if isinstance(n, str) and _REFERENCE.fullmatch(n)}


def steering_fields(fields: Mapping[str, Any] | None, xargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The plugin keys (``lofit_adapter``/``lofit_scale``/``lofit_adapters``) a request gives, from its body fields
    or its ``vllm_xargs`` (``null`` counts as absent); :class:`VLLMValidationError` when both places, or both
    spellings, give one."""
    found = [(where, {k: v for k, v in (m or {}).items() if k in STEERING_KEYS and v is not None})
             for where, m in (("body", fields), ("vllm_xargs", xargs))]
    found = [(where, keys) for where, keys in found if keys]
    if len(found) > 1:
        raise VLLMValidationError("give the adapter choice once: in the body or in vllm_xargs, not both",
                                  parameter="adapter")
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in (found[0][1] if found else {}).items():
        plugin_key = FIELDS.get(key, key)
        if plugin_key in out:
            raise VLLMValidationError(f"the same choice is given twice (as {spelled[plugin_key]!r} and as {key!r}); "
                                      "give it once", parameter=key)
        out[plugin_key], spelled[plugin_key] = value, key
    return out


def parse_weights(keys: Mapping[str, Any], model_adapter: str | None) -> dict[str, float] | None:
    """``{name: weight}`` a request asks for (``None``: no adapter), following the module's rules.

    Args:
        keys: the plugin keys from :func:`steering_fields`.
        model_adapter: the adapter ``model`` names, or ``None`` when ``model`` is the base model.

    Raises:
        VLLMValidationError: malformed names or weights, ``adapter`` with ``adapters``, a choice that
            contradicts ``model``, or ``adapter_scale`` with no adapter.
    """
    name, scale, mix = keys.get(ADAPTER_KEY), keys.get(SCALE_KEY), keys.get(ADAPTERS_KEY)
    if name is not None and mix is not None:
        raise VLLMValidationError("give either 'adapter' (with 'adapter_scale') or 'adapters', not both",
                                  parameter="adapters")
    if scale is not None and mix is not None:
        raise VLLMValidationError("'adapter_scale' goes with 'adapter' (or with an adapter as 'model'); with "
                                  "'adapters' give each weight in the mix", parameter="adapter_scale")
    if name is None and mix is None and model_adapter is not None:
        name = model_adapter
    if name is None and mix is None:
        if scale is not None:
            raise VLLMValidationError("'adapter_scale' needs an adapter: name one with 'adapter' or as 'model'",
                                      parameter="adapter_scale")
        return None
    request = {ADAPTER_KEY: check_name(name)} if name is not None else {ADAPTERS_KEY: mix}
    if scale is not None:
        request[SCALE_KEY] = scale
    try:
        weights = requested_weights(request)
    except CombinationError as exc:
        raise VLLMValidationError(f"invalid adapter choice: {exc}", parameter="adapters") from None
    if not 1 <= len(weights) <= MAX_ADAPTERS:
        raise VLLMValidationError(f"adapters: give 1 to {MAX_ADAPTERS} {{name: weight}} entries",
                                  parameter="adapters")
    for key, weight in weights.items():
        check_name(key)
        if not (math.isfinite(weight) and -MAX_WEIGHT <= weight <= MAX_WEIGHT):
            raise VLLMValidationError(f"the weight of adapter {key!r} must be within [-{MAX_WEIGHT:g}, "
                                      f"{MAX_WEIGHT:g}], got {weight!r}", parameter="adapters")
    if model_adapter is not None and model_adapter not in weights:
        raise VLLMValidationError(f"'model' names adapter {model_adapter!r} but the adapter choice does not "
                                  "include it; use the base model's name as 'model' to choose other adapters",
                                  parameter="model")
    return weights


class SteeringResolver:
    """Turns a request into its :class:`Steering` against the adapters loaded now.

    Args:
        base_names: the served model's names (``model`` values meaning "no adapter").
        loaded: a callable returning the names of the loaded adapters.
    """

    def __init__(self, base_names: list[str], loaded: Any) -> None:
        self.base_names, self.loaded = list(base_names), loaded

    def resolve(self, model: str | None, fields: Mapping[str, Any] | None = None,
                xargs: Mapping[str, Any] | None = None) -> Steering | None:
        """The request's steering, or ``None`` when it names the base model and chooses no adapter.

        Raises:
            VLLMNotFoundError: ``model``, or an adapter named in the choice, is not loaded (HTTP 404).
            VLLMValidationError: a malformed choice (HTTP 400).
        """
        loaded = set(self.loaded())
        if model and model not in self.base_names and model not in loaded:
            raise VLLMNotFoundError(f"The model `{model}` does not exist. Valid aliases: "
                                    f"{', '.join(self.base_names)}; loaded adapters: {', '.join(sorted(loaded))}.")
        model_adapter = model if model and model not in self.base_names else None
        keys = steering_fields(fields, xargs)
        if model_adapter is None and not keys:
            return None
        weights = parse_weights(keys, model_adapter)
        unknown = sorted(set(weights or {}) - loaded)
        if unknown:
            raise VLLMNotFoundError(f"adapter(s) not loaded: {', '.join(unknown)}; loaded: "
                                    f"{', '.join(sorted(loaded)) or 'none'}")
        weights = {n: w for n, w in (weights or {}).items() if w != 0.0}
        return Steering.of(model or self.base_names[0], weights)

    def for_request(self, request: Any) -> Steering | None:
        """:meth:`resolve` for a vLLM protocol request (a pydantic model whose unknown fields are kept)."""
        return self.resolve(getattr(request, "model", None), getattr(request, "model_extra", None),
                            getattr(request, "vllm_xargs", None))
