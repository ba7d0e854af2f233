"""Data-parallel ``lofit-train`` under ``torchrun`` / ``accelerate launch``: ranks, sharding, all-reduce, FSDP2.

Every rank holds the whole (tiny) data set and the same LoFiT parameters; each optimiser step's micro-batches
are dealt round-robin to the ranks, each rank back-propagates its share of the step's loss, and the LoFiT
gradients (``L·H·d`` floats at most) are summed with one ``all_reduce`` before clipping. The result equals a
single-process run whose ``--grad-accum`` is multiplied by the world size (bit for bit on the same kernels).

- ``ddp``: every rank holds the whole frozen base model (data parallelism; the LoFiT module is replicated,
  its gradients all-reduced by hand rather than by ``DistributedDataParallel``, which needs the module's
  ``forward`` to be the model's).
- ``fsdp``: the frozen base is sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``): each decoder
  layer, then the root (embeddings, norm, head); the ``o_proj`` pre-hooks keep steering inside the shards.
  FSDP all-gathers inside every forward and backward, so all ranks must run the same number of them: a rank
  short of work in a step runs its step's first micro-batch again with weight 0 (:meth:`Distributed.lockstep`).

The launcher is detected from its environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``; ``accelerate launch``
with an FSDP config also sets ``ACCELERATE_USE_FSDP=true``). Sources: PyTorch's torchrun and FSDP2 docs;
``accelerate/commands/launch.py`` for the variables it exports.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch

from lofit.train.config import ConfigError

MODES = ("none", "ddp", "fsdp")
T = TypeVar("T")


class RankFailed(RuntimeError):
    """Another rank of this distributed run failed; this rank stops too (its own message names that rank)."""


def launched_world_size(env: dict[str, str] | None = None) -> int:
    """``WORLD_SIZE`` set by ``torchrun`` / ``accelerate launch`` (1 when not launched by one)."""
    env = os.environ if env is None else env
    try:
        return int(env.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={env['WORLD_SIZE']!r} is not a number") from None


def resolve_mode(requested: str | None, env: dict[str, str] | None = None) -> str:
    """The distributed mode to run: ``requested`` checked against the launcher's environment, or detected.

    Detected: ``fsdp`` under ``accelerate launch`` with an FSDP config, ``ddp`` under any other launcher with
    more than one process, else ``none``. Raises :class:`ConfigError` for ``ddp``/``fsdp`` without a launcher
    and for ``none`` under a launcher of several processes (each rank would train alone and race to write)."""
    env = os.environ if env is None else env
    world = launched_world_size(env)
    launched = "RANK" in env and "WORLD_SIZE" in env
    if requested is not None and requested not in MODES:
        raise ConfigError(f"--distributed must be one of {', '.join(MODES)}")
    if requested is None:
        if world <= 1:
            return "none"
        return "fsdp" if env.get("ACCELERATE_USE_FSDP", "").lower() == "true" else "ddp"
    if requested != "none" and not launched:
        raise ConfigError(f"--distributed {requested} needs a launcher that starts the ranks: run "
                          f"`torchrun --nproc_per_node N -m lofit.train.cli ...` or `accelerate launch ...`")
    if requested == "none" and world > 1:
        raise ConfigError(f"launched as {world} processes but --distributed none: each would train alone; "
                          "use --distributed ddp or fsdp (or launch one process)")
    return requested


@dataclass
class Distributed:
    """This process's place in the run: ``mode``, ``rank`` of ``world_size``, and its torch ``device``."""

    mode: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def active(self) -> bool:
        """True when a process group is in use (``ddp`` or ``fsdp``, even with one rank)."""
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the adapter, its picture and its report, and prints the summary."""
        return self.rank == 0

    @property
    def lockstep(self) -> bool:
        """True under FSDP: every rank must run the same number of forwards and backwards."""
        return self.mode == "fsdp" and self.world_size > 1

    @classmethod
    def start(cls, mode: str, device: str, timeout_minutes: float = 30.0) -> Distributed:
        """Join the launcher's process group (``gloo`` on CPU, ``nccl`` on CUDA) or stay single-process.

        ``device`` is the requested device (``cpu``, ``cuda``): under a launcher each rank takes
        ``cuda:LOCAL_RANK``. Raises :class:`ConfigError` for CUDA on a machine without it."""
        kind = torch.device(device).type
        if kind == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA device; "
                              "use --device cpu or install a CUDA build of torch")
        if mode == "none":
            return cls(device=torch.device(device))
        import torch.distributed as dist

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if kind == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise ConfigError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices")
            torch.cuda.set_device(local_rank)
            rank_device = torch.device("cuda", local_rank)
        else:
            rank_device = torch.device(kind)
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ConfigError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} is set but {' and '.join(missing)} not: "
                              "start the ranks with torchrun or accelerate launch (or unset the leftover variables)")
        if "TORCHELASTIC_RUN_ID" not in os.environ and not dist.is_initialized():
            sys.stderr.write(f"lofit-train: rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')} waits for "
                             f"the others at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} (not started by "
                             f"torchrun: unset WORLD_SIZE and RANK for a single process)\n")
            sys.stderr.flush()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if kind == "cuda" else "gloo",
                                    timeout=timedelta(minutes=timeout_minutes))
        return cls(mode=mode, rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                   device=rank_device)

    def close(self) -> None:
        """Leave the process group (no-op when single-process)."""
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    # -- collectives -------------------------------------------------------------------------------------------
    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce ``tensor`` in place with SUM over the ranks (returned; untouched when single-process)."""
        if self.active and self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over the ranks in one flat all-reduce (a missing grad counts as 0)."""
        if not (self.active and self.world_size > 1):
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        self.sum_(flat)
        start = 0
        for p in params:
            p.grad.copy_(flat[start:start + p.numel()].view_as(p))
            start += p.numel()

    def sum_floats(self, *values: float) -> list[float]:
        """Element-wise sums of ``values`` over the ranks (float64)."""
        return self.sum_(torch.tensor(values, dtype=torch.float64, device=self.device)).tolist()

    def gather_float(self, value: float) -> list[float]:
        """``value`` from every rank, in rank order (``[value]`` when single-process)."""
        if not (self.active and self.world_size > 1):
            return [value]
        slots = torch.zeros(self.world_size, dtype=torch.float64, device=self.device)
        slots[self.rank] = value
        return self.sum_(slots).tolist()

    def check_same(self, params: list[torch.nn.Parameter]) -> None:
        """Raise ``RuntimeError`` unless every rank holds bit-identical ``params`` (run once, at the end)."""
        if not (self.active and self.world_size > 1):
            return
        flat = torch.cat([p.detach().reshape(-1).float().cpu() for p in params])
        reference = flat.clone().to(self.device)
        import torch.distributed as dist

        dist.broadcast(reference, src=0)
        differs = torch.tensor([float(not torch.equal(flat, reference.cpu()))], device=self.device)
        self.sum_(differs)
        if differs.item() > 0:
            raise RuntimeError("the ranks ended with different LoFiT parameters (non-deterministic kernels or a "
                               "rank that skipped a step); nothing was written")

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Run ``fn`` on rank 0 only; every rank learns whether it failed.

        Returns ``fn()``'s value on rank 0 and ``None`` elsewhere. If it raised, rank 0 re-raises it and the
        other ranks raise :class:`RankFailed` with its message, so every rank exits non-zero."""
        if not (self.active and self.world_size > 1):
            return fn()
        import torch.distributed as dist

        result, failure, error = None, [None], None
        if self.is_main:
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others have heard
                error = exc
                failure = [str(exc) or type(exc).__name__]
        dist.broadcast_object_list(failure, src=0)
        if error is not None:
            raise error
        if failure[0] is not None:
            raise RankFailed(f"rank 0 failed: {failure[0]}")
        return result

    # -- sharding ----------------------------------------------------------------------------------------------
    def mine(self, items: list[T]) -> list[T]:
        """This rank's round-robin share of ``items`` (all of them when single-process)."""
        return items[self.rank::self.world_size] if self.active else list(items)

    @property
    def local_world_size(self) -> int:
        """Ranks on this node (``LOCAL_WORLD_SIZE`` from the launcher; 1 when single-process)."""
        return int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size)) if self.active else 1

    def barrier(self) -> None:
        """Wait for every rank (no-op when single-process)."""
        if self.active and self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def prepare_mesh(self) -> None:
        """Make FSDP's device mesh (a collective: every rank calls it, before any rank shards)."""
        if self.mode == "fsdp" and getattr(self, "_mesh", None) is None:
            from torch.distributed.device_mesh import init_device_mesh

            self._mesh = init_device_mesh(self.device.type, (self.world_size,))

    def shard_model(self, model: torch.nn.Module, layers: list[torch.nn.Module]) -> None:
        """FSDP2: shard each of ``layers`` (the decoder layers), then the rest of ``model``, over all ranks.

        A local operation (each rank keeps its slice of the full tensors it holds); call :meth:`prepare_mesh`
        on every rank first."""
        if self.mode != "fsdp":
            return
        from torch.distributed.fsdp import fully_shard

        self.prepare_mesh()
        for layer in layers:
            fully_shard(layer, mesh=self._mesh)
        fully_shard(model, mesh=self._mesh)


def local_parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``model``'s parameters held by this process (a sharded parameter counts its local shard)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total
