"""The adapter bank of one worker: fixed-address offset tables, a per-token row index, and the rows that
running requests hold (:class:`RequestRows`).

``tables[layer]`` is ``[capacity, heads_local * head_dim]``; row 0 is all zeros ("no adapter") and every
other row holds the summed, weighted offsets of one adapter combination, laid out exactly like the input
of ``o_proj`` on this tensor-parallel rank. Each step the runner writes, for every scheduled token, the
row of its request into ``token_rows`` (on the host through pinned staging: :meth:`AdapterBank.fill_token_rows`,
V1 runner; or on the device: :func:`fill_token_rows_v2`, V2 runner); the model then adds
``tables[layer][token_rows[:n]]`` to the input of ``o_proj`` — a branch-free gather-add that torch.compile and
CUDA graphs can capture once. Plain torch: this module imports no vLLM (``scripts/gpu-check.sh`` uses it).

The tables and the token-row buffer are allocated once and only ever written in place, and they are
plain tensors on a plain object (not parameters or buffers, which inductor freezing could fold into
constants). Rows are reference-counted per combination; a row whose count drops to zero stays cached
for reuse and is recycled least-recently-used when a new combination needs room.

Adapter content is kept by content hash, and names point at content. A request is admitted with the exact
content hashes it will use (stamped by the engine core, see :mod:`lofit.vllm.admission`), so reloading or
unloading a name never changes what an admitted request computes, and its prefix-cache salt always
matches the content its KV was computed with.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lofit.adapter import AdapterError, LofitAdapter
from lofit.heads import BaseModelIdentity
from lofit.vllm.contract import Combination, requested_weights, resolved_combination

RETAINED = 64  # unnamed, unused adapter contents kept for requests admitted just before a reload or unload


class BankError(RuntimeError):
    """A bank operation that cannot be done (unknown adapter, adapter in use, no free row)."""


@dataclass
class _Row:
    index: int
    refcount: int = 0


class AdapterBank:
    """Resident adapters, one table row per live combination, and the per-token row buffer."""

    def __init__(self, base: BaseModelIdentity, capacity: int, max_num_tokens: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 tp_rank: int = 0, tp_size: int = 1) -> None:
        if capacity < 2:
            raise ValueError("capacity must be at least 2 (row 0 is reserved for 'no adapter')")
        if base.num_attention_heads % tp_size:
            raise ValueError(f"tensor parallel size {tp_size} must divide the {base.num_attention_heads} "
                             "attention heads")
        self.base = base
        self.heads_per_rank = base.num_attention_heads // tp_size
        self.first_head = tp_rank * self.heads_per_rank
        width = self.heads_per_rank * base.head_dim
        self.tables = torch.zeros(base.num_hidden_layers, capacity, width, dtype=dtype, device=device)
        self.token_rows = torch.zeros(max_num_tokens, dtype=torch.int64, device=device)
        # host staging for the V1 fill: pinned on CUDA so the copy to the device is asynchronous (no host sync
        # per step); the event of the last copy guards the staging buffer before it is written again
        on_cuda = torch.device(device).type == "cuda"
        self._staging = torch.zeros(max_num_tokens, dtype=torch.int64, pin_memory=on_cuda)
        self._staged: torch.cuda.Event | None = None
        self._contents: OrderedDict[str, LofitAdapter] = OrderedDict()  # content_sha256 -> adapter, oldest first
        self._names: dict[str, str] = {}  # name -> content_sha256
        self._rows: OrderedDict[Combination, _Row] = OrderedDict()  # least recently used first
        self._free = list(range(capacity - 1, 0, -1))

    @property
    def capacity(self) -> int:
        """Rows of the offset tables, row 0 (all zeros: no adapter) included."""
        return self.tables.shape[1]

    # -- adapters -------------------------------------------------------------------------------------

    def load(self, adapter: LofitAdapter, pinned: Sequence[str] = ()) -> str:
        """Make ``adapter`` resident under its name (replacing older content); returns its content hash.

        Content is kept by hash: requests admitted with the older content keep getting it until they end.
        ``pinned``: content hashes that requests still waiting or preempted were admitted with (the engine
        core's view); they are never evicted, however many reloads happen before those requests run.
        """
        problems = adapter.base_model.mismatches(self.base)
        if problems:
            raise AdapterError(f"adapter {adapter.name!r} does not fit the served model: " + "; ".join(problems))
        sha = adapter.content_sha256
        self._contents[sha] = adapter
        self._contents.move_to_end(sha)
        self._names[adapter.name] = sha
        self._evict_retired(pinned)
        return sha

    def unload(self, name: str, pinned: Sequence[str] = ()) -> None:
        """Forget the name ``name``. Requests that use its content keep it until they end (``pinned``: as in
        :meth:`load`)."""
        if name not in self._names:
            raise BankError(f"adapter {name!r} is not loaded")
        del self._names[name]
        self._evict_retired(pinned)

    def loaded(self) -> dict[str, str]:
        """``{name: content_sha256}`` of the adapters that requests can name."""
        return dict(self._names)

    def combination(self, weights: dict[str, float]) -> Combination:
        """Resolve ``{name: weight}`` against the names loaded now."""
        unknown = sorted(set(weights) - set(self._names))
        if unknown:
            raise BankError(f"adapter(s) {unknown} are not loaded")
        return Combination.of({n: (self._names[n], w) for n, w in weights.items()})

    def _evict_retired(self, pinned: Sequence[str] = ()) -> None:
        """Drop content no name points at, no held row uses and no live request is pinned to, beyond the newest
        ``RETAINED`` such items."""
        held = {sha for combo, row in self._rows.items() if row.refcount for _, sha, _ in combo.parts}
        keep = set(self._names.values()) | held | set(pinned)
        retired = [sha for sha in self._contents if sha not in keep]  # oldest first
        for sha in retired[: max(0, len(retired) - RETAINED)]:
            del self._contents[sha]
            for combo in [c for c in self._rows if sha in c.shas]:
                self._free.append(self._rows.pop(combo).index)

    # -- rows -----------------------------------------------------------------------------------------

    def acquire(self, combo: Combination | dict[str, float]) -> tuple[int, Combination]:
        """The row for this combination (written now if new) with its count raised by one.

        A ``{name: weight}`` dict is resolved against the names loaded now; a :class:`Combination` names
        exact content (what the engine stamped on the request at admission).
        """
        if isinstance(combo, dict):
            combo = self.combination(combo)
        missing = [name for name, sha, _ in combo.parts if sha not in self._contents]
        if missing:
            raise BankError(f"content of adapter(s) {missing} is no longer resident")
        row = self._rows.get(combo)
        if row is None:
            row = _Row(self._take_row())
            self._write(row.index, combo)
            self._rows[combo] = row
        self._rows.move_to_end(combo)
        row.refcount += 1
        return row.index, combo

    def release(self, combo: Combination) -> None:
        """Drop one reference to ``combo``'s row (it stays cached, reusable, until evicted); raises
        :class:`BankError` if no request holds it."""
        row = self._rows.get(combo)
        if row is None or row.refcount == 0:
            raise BankError(f"release of a combination that holds no row ({combo.names})")
        row.refcount -= 1

    def refcounts(self) -> dict[tuple[str, ...], int]:
        """Requests holding each cached combination's row, keyed by its adapter names (for tests and stats)."""
        return {combo.names: row.refcount for combo, row in self._rows.items()}

    def _take_row(self) -> int:
        if self._free:
            return self._free.pop()
        for combo, row in self._rows.items():  # least recently used idle row
            if row.refcount == 0:
                del self._rows[combo]
                return row.index
        raise BankError(f"all {self.capacity - 1} adapter rows are held by running requests; "
                        "raise the bank capacity (at least max_num_seqs + 1)")

    def _write(self, index: int, combo: Combination) -> None:
        """Fill one row in place with the weighted sum of this rank's columns of each adapter."""
        layout = self.base.layout
        total = torch.zeros(layout.num_layers, layout.num_heads, layout.head_dim)
        for _, sha, weight in combo.parts:
            total += weight * self._contents[sha].dense_offsets()
        local = total[:, self.first_head:self.first_head + self.heads_per_rank].reshape(layout.num_layers, -1)
        self.tables[:, index].copy_(local)

    # -- per step -------------------------------------------------------------------------------------

    def fill_token_rows(self, request_rows: Sequence[int], request_tokens: Sequence[int],
                        num_padded: int | None = None) -> int:
        """Host-side fill (V1 runner): request ``i``'s row for each of its scheduled tokens, 0 after.

        Returns the number of real tokens. ``num_padded`` zeroes the padding up to that size. On CUDA the rows
        go through a pinned staging buffer with a non-blocking copy (stream-ordered before the forward that
        reads them), so the fill does not wait for the device.
        """
        rows = torch.tensor(request_rows, dtype=torch.int64)
        counts = torch.tensor(request_tokens, dtype=torch.int64)
        per_token = torch.repeat_interleave(rows, counts)
        n = per_token.numel()
        end = max(n, num_padded or n)
        if end > self.token_rows.numel():
            raise BankError(f"{end} tokens exceed the bank's token buffer ({self.token_rows.numel()})")
        if self._staged is not None:
            self._staged.synchronize()  # the previous step's copy has read the staging buffer
        self._staging[:n].copy_(per_token)
        self._staging[n:end].zero_()
        self.token_rows[:end].copy_(self._staging[:end], non_blocking=True)
        if self.token_rows.is_cuda:
            self._staged = torch.cuda.Event()
            self._staged.record()
        return n

    def apply(self, layer: int, attn_output: torch.Tensor) -> torch.Tensor:
        """``attn_output [n, heads_local*head_dim]`` plus each token's row of ``tables[layer]``."""
        rows = self.token_rows[: attn_output.shape[0]]
        return attn_output + self.tables[layer].index_select(0, rows).to(attn_output.dtype)


def fill_token_rows_v2(token_rows: torch.Tensor, slot_rows: torch.Tensor, idx_mapping: torch.Tensor,
                       query_start_loc: torch.Tensor, num_reqs: int, num_tokens: int, num_padded: int) -> None:
    """Write each token's bank row into ``token_rows[:num_tokens]`` and zeros up to ``num_padded``.

    Batch position ``i`` holds the request in persistent slot ``idx_mapping[i]``, whose row is
    ``slot_rows[idx_mapping[i]]``; its tokens are ``query_start_loc[i]:query_start_loc[i + 1]``. Only
    device ops with sizes known on the host, so nothing waits for the device.
    """
    end = max(num_tokens, num_padded)
    if end > token_rows.numel():
        raise ValueError(f"{end} tokens exceed the bank's token buffer ({token_rows.numel()})")
    if num_reqs > 0 and num_tokens > 0:
        row_of_req = slot_rows.index_select(0, idx_mapping[:num_reqs])
        ends = query_start_loc[1:num_reqs + 1]
        token_index = torch.arange(num_tokens, dtype=ends.dtype, device=ends.device)
        # request of each token = number of requests that end at or before it; clamped so that a
        # malformed query_start_loc can never index past the batch on the device.
        req_of_token = torch.searchsorted(ends, token_index, right=True).clamp_(max=num_reqs - 1)
        token_rows[:num_tokens] = row_of_req[req_of_token]
    else:
        num_tokens = 0
    token_rows[num_tokens:end].zero_()


_ACTIVE: dict[str, AdapterBank] = {}  # a plain global: compiled graphs read its tensors at call time


def install_bank(bank: AdapterBank) -> None:
    """Make ``bank`` the one this process's LoFiT model layers read (one model per worker process)."""
    _ACTIVE["bank"] = bank


def has_bank() -> bool:
    """Whether this process (a vLLM worker) has installed an adapter bank."""
    return "bank" in _ACTIVE


def active_bank() -> AdapterBank:
    """This worker's adapter bank; raises ``RuntimeError`` if none is installed."""
    bank = _ACTIVE.get("bank")
    if bank is None:
        raise RuntimeError("no LoFiT adapter bank is installed in this process")
    return bank


class RequestRows:
    """Bank rows held by running requests: acquired on a request's first step, released when it ends."""

    def __init__(self, bank: AdapterBank) -> None:
        self.bank = bank
        self._held: dict[str, tuple[int, Combination | None]] = {}

    def row_for(self, req_id: str, extra_args: dict[str, Any] | None) -> int:
        """The bank row of request ``req_id`` (0 without an adapter), acquired from its resolved stamp in
        ``extra_args`` on the first call and the same row on every later step."""
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
