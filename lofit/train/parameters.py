"""The trainable LoFiT tables as one small ``nn.Module``, attached to a model by ``o_proj`` pre-hooks.

For layer ``l``, head ``h`` and every position, the head's attention output ``z`` (columns ``h*d:(h+1)*d`` of
``o_proj``'s input) becomes ``(1 + A[l, h]) * z`` in stage 1 and ``z + v[l, h]`` in stage 2 (Yin et al., 2024,
§3; the reference code's site). This is the same edit as :class:`lofit.intervene.LofitHooks`, the inference
oracle, with two differences that training at scale needs:

- the tables are ``nn.Parameter`` s of a module, so optimisers, ``state_dict``, FSDP's ``ignored_params`` and
  gradient all-reduce see them (a bare tensor held by a hook is invisible to them: the lesson of
  stanfordnlp/pyvene#204);
- every edit moves the table slice to the activation's device and dtype, so a model spread over several
  devices (``device_map="auto"``) or run under bf16 autocast is steered in place, while the parameters stay
  ``float32`` on their own device.

The module is *not* registered as a submodule of the model: the base model's ``state_dict``, parameter count
and fingerprint stay those of the checkpoint, and FSDP never shards the LoFiT tables.
"""

from __future__ import annotations

import torch

from lofit.heads import HeadLayout, hook_o_proj_inputs, layout_from_config


class LofitParameters(torch.nn.Module):
    """Stage-1 scales ``A`` and/or stage-2 offsets ``v`` as parameters, applied at every ``o_proj`` input.

    Args:
        layout: the model's head layout (``L`` layers, ``H`` heads of width ``d``).
        scales: initial ``A``, float32 ``[L, H, d]`` (stage 1: every head), or ``None``.
        heads: ``[K, 2]`` int64 ``(layer, head)`` rows that carry an offset (stage 2), or ``None``.
        offsets: initial ``v``, float32 ``[K, d]``, one row per entry of ``heads``; heads not listed keep a
            zero offset (they receive no gradient at all).

    Raises ``ValueError`` when the shapes do not fit the layout.

    Example::

        lofit = LofitParameters(layout, heads=torch.tensor([[3, 1], [7, 0]]), offsets=torch.zeros(2, 64))
        with lofit.attach(model):
            loss = model(input_ids).logits.sum()
        loss.backward()  # lofit.offsets.grad is [2, 64]
    """

    def __init__(self, layout: HeadLayout, scales: torch.Tensor | None = None, heads: torch.Tensor | None = None,
                 offsets: torch.Tensor | None = None) -> None:
        super().__init__()
        self.layout = layout
        shape = (layout.num_layers, layout.num_heads, layout.head_dim)
        if scales is not None and tuple(scales.shape) != shape:
            raise ValueError(f"scales must have shape {list(shape)}, got {list(scales.shape)}")
        if (heads is None) != (offsets is None):
            raise ValueError("heads and offsets go together")
        self.scales = None if scales is None else torch.nn.Parameter(scales.detach().float().clone())
        self.offsets = None
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (rows of offsets, head ids)
        if offsets is not None:
            heads = heads.to(torch.int64).cpu()
            if heads.dim() != 2 or heads.shape[1] != 2 or tuple(offsets.shape) != (len(heads), layout.head_dim):
                raise ValueError(f"heads must be [K, 2] and offsets [K, {layout.head_dim}]; got "
                                 f"{list(heads.shape)} and {list(offsets.shape)}")
            if len(heads) and (heads.min() < 0 or heads[:, 0].max() >= layout.num_layers
                               or heads[:, 1].max() >= layout.num_heads):
                raise ValueError(f"a head lies outside the model's {layout.num_layers} x {layout.num_heads} heads")
            self.offsets = torch.nn.Parameter(offsets.detach().float().clone())
            self.register_buffer("heads", heads, persistent=True)
            for layer in heads[:, 0].unique().tolist():
                rows = (heads[:, 0] == layer).nonzero().flatten()
                self._rows[layer] = (rows, heads[rows, 1])
        self._device_rows: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _edit(self, layer: int, _module: torch.nn.Module, args: tuple[torch.Tensor, ...]):
        steered = layer in self._rows
        if self.scales is None and not steered:
            return None
        x = args[0]
        z = x.view(*x.shape[:-1], self.layout.num_heads, self.layout.head_dim)
        if self.scales is not None:
            z = z * (1 + self.scales[layer].to(z.device, z.dtype))
        if steered:
            rows, head_ids = self._rows_on(layer, self.offsets.device)
            table = self.offsets.new_zeros(self.layout.num_heads, self.layout.head_dim)
            table = table.index_put((head_ids,), self.offsets[rows])
            z = z + table.to(z.device, z.dtype)
        return (z.reshape(x.shape), *args[1:])

    def _rows_on(self, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s (rows of ``offsets``, head ids), cached on ``device`` (no host copy per forward)."""
        key = (layer, device)
        if key not in self._device_rows:
            self._device_rows[key] = tuple(t.to(device) for t in self._rows[layer])
        return self._device_rows[key]

    def attach(self, model: torch.nn.Module) -> LofitParameters:
        """Hook every ``o_proj`` of ``model`` (usable as a context manager that detaches on exit).

        Raises :class:`~lofit.heads.UnsupportedModelError` when ``o_proj``'s input is not heads x head_dim, and
        ``RuntimeError`` when already attached."""
        if self._handles:
            raise RuntimeError("these LoFiT parameters are already attached to a model")
        if layout_from_config(model.config) != self.layout:
            raise ValueError("the model's head layout differs from these LoFiT parameters'")
        self._handles = hook_o_proj_inputs(model, self.layout, self._edit)
        return self

    def detach(self) -> None:
        """Remove the hooks; the model runs unsteered afterwards (safe to call twice)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> LofitParameters:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def trainable(self) -> list[torch.nn.Parameter]:
        """The parameters the optimiser updates (scales, offsets or both), in a fixed order."""
        return [p for p in (self.scales, self.offsets) if p is not None]
