"""The transformers reference path: apply LoFiT at the input of every ``o_proj``.

For layer ``l``, head ``h`` and every token position, the head's attention output ``z`` (columns
``h*d:(h+1)*d`` of ``o_proj``'s input) becomes ``(1 + A[l, h]) * z + v[l, h]``. This is implemented with
one forward pre-hook per ``o_proj``, which is exactly the site of the reference code, and works for any
Llama-style model (Llama/SmolLM2, Mistral, Qwen2) with any attention implementation.

This module is the oracle that faster paths (the vLLM plugin) are tested against, so it stays simple:
dense ``[layers, heads, head_dim]`` tables, zero where a head is not selected, optionally one table per
batch row.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from lofit.adapter import BaseModelMismatchError, LofitAdapter
from lofit.heads import HeadLayout, hook_o_proj_inputs, identity_from_model, layout_from_config


class LofitHooks:
    """Forward pre-hooks that edit ``o_proj``'s input; set ``scales`` / ``offsets`` to steer.

    ``scales``: ``[L, H, d]`` (stage-1 ``A``) or ``None``.
    ``offsets``: ``[L, H, d]`` (one adapter for the whole batch), ``[B, L, H, d]`` (one per batch row;
    a zero table means "no adapter" for that row) or ``None``.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.layout: HeadLayout = layout_from_config(model.config)
        self.scales: torch.Tensor | None = None
        self.offsets: torch.Tensor | None = None
        self._handles = hook_o_proj_inputs(model, self.layout, self._edit)

    def _edit(self, layer: int, _module: torch.nn.Module, args: tuple[torch.Tensor, ...]):
        if self.scales is None and self.offsets is None:
            return None
        x = args[0]
        z = x.view(*x.shape[:-1], self.layout.num_heads, self.layout.head_dim)
        if self.scales is not None:
            z = z * (1 + self.scales[layer].to(z.device, z.dtype))
        if self.offsets is not None:
            v = self.offsets[..., layer, :, :].to(z.device, z.dtype)
            if v.dim() == 3:  # one table per batch row: [B, H, d] -> broadcast over positions
                if v.shape[0] != z.shape[0]:
                    raise ValueError(f"per-row offsets cover {v.shape[0]} rows, the batch has {z.shape[0]}")
                v = v.view(v.shape[0], *([1] * (z.dim() - 3)), *v.shape[1:])
            z = z + v
        return (z.reshape(x.shape), *args[1:])

    def remove(self) -> None:
        """Detach every hook; the model is unsteered afterwards (safe to call twice)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.scales = self.offsets = None

    def __enter__(self) -> LofitHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def dense_table(heads: torch.Tensor, values: torch.Tensor, layout: HeadLayout) -> torch.Tensor:
    """Scatter per-head vectors ``values[K, d]`` at ``heads[K, 2]`` into a zero ``[L, H, d]`` table.

    Differentiable in ``values`` (used by stage 2, where only the selected heads' offsets train).
    """
    table = values.new_zeros(layout.num_layers, layout.num_heads, layout.head_dim)
    return table.index_put((heads[:, 0], heads[:, 1]), values)


def batch_offsets(adapters: Sequence[LofitAdapter | None], layout: HeadLayout,
                  strengths: Sequence[float] | None = None) -> torch.Tensor:
    """``[B, L, H, d]`` offsets for a batch where row ``i`` uses ``adapters[i]`` (``None``: no adapter)."""
    strengths = strengths or [1.0] * len(adapters)
    if len(strengths) != len(adapters):
        raise ValueError("one strength per adapter row is needed")
    table = torch.zeros(len(adapters), layout.num_layers, layout.num_heads, layout.head_dim)
    for row, (adapter, strength) in enumerate(zip(adapters, strengths, strict=True)):
        if adapter is not None:
            table[row] = adapter.dense_offsets() * strength
    return table


def check_compatible(model: torch.nn.Module, adapters: Sequence[LofitAdapter | None],
                     check_fingerprint: bool = True) -> None:
    """Raise :class:`BaseModelMismatchError` if any adapter was trained on another base model."""
    present = [a for a in adapters if a is not None]
    if not present:
        return
    name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "model")
    identity = identity_from_model(model, name) if check_fingerprint else None
    layout = layout_from_config(model.config)
    for adapter in present:
        if identity is not None:
            problems = adapter.base_model.mismatches(identity)
        else:
            problems = [] if adapter.base_model.layout == layout else [
                f"head layout: adapter has {adapter.base_model.layout}, model has {layout}"]
        if problems:
            raise BaseModelMismatchError(
                f"adapter {adapter.name!r} was trained on {adapter.base_model.name_or_path!r}, not on this "
                f"model ({name!r}): " + "; ".join(problems))


@contextmanager
def apply_adapters(model: torch.nn.Module, adapters: LofitAdapter | Sequence[LofitAdapter | None] | None,
                   strengths: Sequence[float] | None = None,
                   check_fingerprint: bool = True) -> Iterator[LofitHooks]:
    """Steer ``model`` inside the block: one adapter for every row, or a list with one entry per row.

    Example::

        with apply_adapters(model, [truthful, None, mquake]):
            logits = model(input_ids).logits   # row 1 runs the plain base model
    """
    per_row = adapters is not None and not isinstance(adapters, LofitAdapter)
    listed = list(adapters) if per_row else [adapters]
    check_compatible(model, listed, check_fingerprint)
    hooks = LofitHooks(model)
    try:
        param = next(model.parameters())
        if per_row:
            hooks.offsets = batch_offsets(listed, hooks.layout, strengths).to(param.device)
        elif adapters is not None:
            strength = strengths[0] if strengths else 1.0
            hooks.offsets = (adapters.dense_offsets() * strength).to(param.device)
        yield hooks
    finally:
        hooks.remove()


def combine(parts: Sequence[tuple[LofitAdapter, float]], name: str = "combined") -> LofitAdapter:
    """One adapter equal to the weighted sum ``Σ w·offsets`` of adapters of the same base model.

    This is what a served request with ``{"lofit_adapters": {a: w_a, b: w_b}}`` applies; scales (stage-1
    adapters) are not combined.
    """
    if not parts:
        raise ValueError("combine() needs at least one (adapter, weight) pair")
    base = parts[0][0].base_model
    total = torch.zeros(base.layout.num_layers, base.layout.num_heads, base.layout.head_dim)
    for adapter, weight in parts:
        problems = adapter.base_model.mismatches(base)
        if problems:
            raise BaseModelMismatchError(f"cannot combine adapters of different base models: {'; '.join(problems)}")
        total += float(weight) * adapter.dense_offsets()
    heads = torch.unique(torch.cat([adapter.heads for adapter, _ in parts]), dim=0)
    return LofitAdapter(heads=heads, offsets=total[heads[:, 0], heads[:, 1]], base_model=base, name=name)
